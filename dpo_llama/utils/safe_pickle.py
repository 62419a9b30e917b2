"""Atomic saving and allow-list loading of dataset pickles.

Tokenized datasets are pickled lists/dicts of numpy arrays (int32 token ids, bool masks,
float32 log-probs) and plain Python values. Plain ``pickle.load`` runs any callable a file
names, so a downloaded dataset could execute code. :func:`load_pickle` only lets a pickle
reference the few numpy globals such data needs; containers, numbers, strings and bytes
are pickle opcodes, not globals, and need no permission.
"""

import importlib
import os
import pickle
from pathlib import Path
from typing import Any


def _numpy_core_name() -> str:
    """The installed name of numpy's core package: ``numpy._core`` (2.x) or ``numpy.core`` (1.x)."""
    try:
        importlib.import_module("numpy._core.multiarray")
    except ImportError:
        return "numpy.core"
    return "numpy._core"


_NUMPY_CORE = _numpy_core_name()

# (module, name) pairs a dataset pickle may reference, spelled with numpy 2.x module names.
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),  # ndarray.__reduce__ (pickle protocol <= 4)
        ("numpy._core.numeric", "_frombuffer"),  # ndarray.__reduce_ex__ (pickle protocol 5)
        ("numpy._core.multiarray", "scalar"),  # numpy scalars such as np.float32(1.5)
    }
)


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle referenced a global outside the allow-list (a ``ValueError`` too: bad input data)."""


class DatasetUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals in ``_ALLOWED_GLOBALS``.

    numpy 1.x writes ``numpy.core.multiarray`` where numpy 2.x writes
    ``numpy._core.multiarray``; both spellings are accepted and mapped to the installed one.
    """

    def find_class(self, module: str, name: str) -> Any:
        """Return the allowed global ``module.name`` or raise :class:`UnsafePickleError`."""
        canonical = module.replace("numpy.core.", "numpy._core.", 1)
        if (canonical, name) not in _ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"refused to load global '{module}.{name}': dataset pickles may only contain "
                "numpy arrays, numpy dtypes/scalars and plain Python values"
            )
        return super().find_class(canonical.replace("numpy._core", _NUMPY_CORE, 1), name)


def save_pickle(obj: Any, path: str | Path) -> None:
    """Pickle ``obj`` to ``path`` atomically.

    The data goes to a temporary file in the same directory, is flushed and fsync'ed, and
    then ``os.replace`` moves it over ``path``: readers see the old file or the complete new
    one, never a partial write. Parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp_path, "wb") as file:
            pickle.dump(obj, file, protocol=pickle.HIGHEST_PROTOCOL)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def load_pickle(path: str | Path) -> Any:
    """Load a dataset pickle, refusing any global outside the numpy allow-list.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafePickleError: the pickle references a disallowed global (nothing was executed).
        ValueError: the file is not a readable pickle (truncated or corrupt).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset pickle not found: {path}")
    with open(path, "rb") as file:
        try:
            return DatasetUnpickler(file).load()
        except UnsafePickleError as error:
            raise UnsafePickleError(f"{path}: {error}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                KeyError) as error:
            raise ValueError(f"{path} is not a readable dataset pickle ({type(error).__name__}: {error}): "
                             "rebuild it") from None
