"""Turn a config dataclass into a command line, and save resolved configs as JSON.

Every dataclass field becomes a flag, spelled ``--field-name`` or ``--field_name``; its
help text comes from ``field(metadata={"help": ...})``. Supported field types:

- ``str``, ``int``, ``float``;
- ``bool``: ``--flag``, ``--flag true|false`` (also yes/no, 1/0) and ``--no-flag``;
- ``Optional[X]``: the value ``none`` (any case) gives ``None``;
- ``Literal[...]``: the value must be one of the literals (listed in ``--help``);
- ``list[X]`` and ``tuple[X, ...]``: one or more values; ``tuple[X, Y]``: exactly two.

Unknown flags are an error that suggests the closest known flag.
"""

import argparse
import dataclasses
import difflib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

ConfigT = TypeVar("ConfigT")

_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


def parse_bool(text: str) -> bool:
    """Parse ``true/false`` (also ``yes/no``, ``1/0``, ``on/off``), case-insensitively."""
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_bool_flag(parser: argparse.ArgumentParser, name: str, help: str, **default: bool) -> None:
    """``--name`` (true), ``--name true|false`` and ``--no-name`` (false), plus the hidden underscore spellings
    ``--no_name`` and, for a ``name`` with underscores, ``--name_part``; ``default=`` as in ``add_argument``."""
    dashed = _dashed(name)
    parser.add_argument(f"--{dashed}", dest=name, type=parse_bool, nargs="?", const=True, help=help, **default)
    if dashed != name:
        parser.add_argument(f"--{name}", dest=name, type=parse_bool, nargs="?", const=True, help=argparse.SUPPRESS,
                            **default)
    parser.add_argument(f"--no-{dashed}", dest=name, action="store_false", help=f"Set {dashed} to false.", **default)
    parser.add_argument(f"--no_{name}", dest=name, action="store_false", help=argparse.SUPPRESS, **default)


def at_least(minimum: float, kind: type = int) -> Callable[[str], Any]:
    """An argparse ``type`` that parses ``kind`` (int or float) and refuses values below ``minimum`` (and, for
    floats, NaN and infinity), e.g. ``type=at_least(1)`` for a length."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"must be a finite number >= {minimum}, got {text!r}")
        return value

    return parse


def probability(text: str) -> float:
    """An argparse ``type``: a number from 0 to 1."""
    value = at_least(0.0, float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a probability from 0 to 1, got {text!r}")
    return value


def add_max_shard_gb(parser: argparse.ArgumentParser) -> None:
    """``--max-shard-gb`` of the scripts that write checkpoints, parsed into ``args.max_shard_bytes``."""

    def gib_to_bytes(text: str) -> int:
        return int(at_least(1e-6, float)(text) * 1024**3)

    parser.add_argument("--max-shard-gb", dest="max_shard_bytes", type=gib_to_bytes, default=4 * 1024**3,
                        metavar="GB", help="largest output shard in GiB (default: 4)")


def refuse_a_file_in_the_way(flag: str, directory: str | Path) -> None:
    """Refuses (ValueError) a ``directory`` that is, or whose nearest existing parent is, a file: the command would
    otherwise fail only when it first writes there (for a trainer, the first checkpoint, hours in)."""
    directory = Path(directory)
    for path in (directory, *directory.parents):
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"{flag} {directory}: {path} is a file, not a directory")
            return


def check_output_directory(output: str | Path, **inputs: str | Path) -> None:
    """Refuses (ValueError) an ``--output`` directory where a file is in the way (see refuse_a_file_in_the_way) or
    that is one of the ``inputs`` (flag name -> directory): writing it would overwrite the files being read."""
    refuse_a_file_in_the_way("--output", output)
    clashes = [name for name, directory in inputs.items() if Path(directory).resolve() == Path(output).resolve()]
    if clashes:
        raise ValueError(f"--output {output} must differ from {' and '.join(f'--{name}' for name in clashes)} "
                         "(its files would be overwritten)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The scripts' ``--help``: the description as written (its example commands intact), and each option's default
    appended unless its help already names one (or it has none: ``None``, a switch that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _optional_inner(tp: Any) -> Any:
    """Return X for ``Optional[X]`` / ``X | None``, else None."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return None
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) != 1 or len(typing.get_args(tp)) != 2:
        return None
    return args[0]


def _allow_none(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wrap a converter so that ``none`` (any case) gives None."""

    def convert_or_none(text: str) -> Any:
        return None if text.lower() == "none" else convert(text)

    convert_or_none.__name__ = getattr(convert, "__name__", "value")
    return convert_or_none


def _type_name(tp: Any) -> str:
    """Readable name of a type annotation for --help (choices are shown by the metavar)."""
    if typing.get_origin(tp) is typing.Literal:
        return "choice"
    return tp.__name__ if isinstance(tp, type) and not typing.get_args(tp) else str(tp).replace("typing.", "")


def _argument_spec(name: str, tp: Any) -> dict[str, Any]:
    """argparse keyword arguments (type, nargs, choices) for a field of type ``tp``.

    Raises:
        TypeError: the type is not one of the supported kinds listed in the module docstring.
    """
    inner = _optional_inner(tp)
    if inner is not None:
        spec = _argument_spec(name, inner)
        spec["type"] = _allow_none(spec["type"])
        if "choices" in spec:
            spec["choices"] = [*spec["choices"], None]
        if spec.get("nargs") not in (None, "?"):
            spec["nargs"] = "+"  # `none` alone, or the values (counted by _container_values)
        return spec
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return {"type": parse_bool, "nargs": "?", "const": True}
    if tp in (str, int, float):
        return {"type": tp}
    if origin is typing.Literal:
        return {"type": type(args[0]), "choices": list(args)}
    if origin is list and len(args) == 1:
        return {"type": _argument_spec(name, args[0])["type"], "nargs": "+"}
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return {"type": _argument_spec(name, args[0])["type"], "nargs": "+"}
    if origin is tuple and args and len(set(args)) == 1:
        return {"type": _argument_spec(name, args[0])["type"], "nargs": len(args)}
    raise TypeError(f"field {name!r}: unsupported type {tp!r} for a command-line flag")


def _field_default(f: dataclasses.Field) -> Any:
    """The field's default value, or MISSING."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _help_text(f: dataclasses.Field, tp: Any) -> str:
    """``<help> (type: X, default: Y)``, escaped for argparse's %-formatting."""
    default = _field_default(f)
    default_text = "required" if default is dataclasses.MISSING else f"default: {default!r}"
    text = f"{f.metadata.get('help', '')} (type: {_type_name(tp)}, {default_text})".strip()
    return text.replace("%", "%%")


def _dashed(name: str) -> str:
    """A field's flag as ``--help`` shows it: ``max_train_steps`` -> ``max-train-steps``."""
    return name.replace("_", "-")


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, tp: Any) -> None:
    """Add ``--field-name`` (and ``--no-field-name`` for bools) plus hidden underscore spellings."""
    if tp is bool:
        add_bool_flag(parser, f.name, _help_text(f, tp))
        return
    spec = _argument_spec(f.name, tp)
    if "choices" in spec:
        spec["metavar"] = "{" + ",".join("none" if c is None else str(c) for c in spec["choices"]) + "}"
    dashed = _dashed(f.name)
    parser.add_argument(f"--{dashed}", dest=f.name, help=_help_text(f, tp), **spec)
    if dashed != f.name:
        parser.add_argument(f"--{f.name}", dest=f.name, help=argparse.SUPPRESS, **spec)


def build_parser(config_cls: type, description: str = "") -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per init field of the dataclass ``config_cls``.

    Flags default to ``argparse.SUPPRESS`` so that only given flags override the dataclass's
    own defaults (``default_factory`` included).
    """
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"{config_cls!r} is not a dataclass")
    parser = argparse.ArgumentParser(
        description=description or config_cls.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keep the docstring's example commands intact
        epilog="Every flag may also be spelled with underscores, e.g. --max_train_steps.",
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        if f.init:
            _add_field(parser, f, hints[f.name])
    return parser


def _container_values(config_cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """List values (argparse and JSON give lists) as their fields' types: ``none`` alone is None for an optional
    list or tuple, tuple fields get tuples.

    Raises:
        ValueError: ``none`` among other values, or a fixed-size tuple given another number of values.
    """
    hints = typing.get_type_hints(config_cls)
    converted = dict(values)
    for name, value in values.items():
        if not isinstance(value, list):
            continue
        optional = _optional_inner(hints[name])
        tp = optional or hints[name]
        if value == [None] and optional is not None:
            converted[name] = None
            continue
        if None in value:
            raise ValueError(f"--{_dashed(name)}: 'none' must be its only value")
        args = typing.get_args(tp)
        if typing.get_origin(tp) is tuple:
            if Ellipsis not in args and len(value) != len(args):
                raise ValueError(f"--{_dashed(name)}: expected {len(args)} values, got {len(value)}")
            converted[name] = tuple(value)
    return converted


def _missing_required(config_cls: type, values: dict[str, Any]) -> list[str]:
    """The flags of fields without a default that are not in ``values`` (either spelling given counts)."""
    return [f"--{_dashed(f.name)}" for f in dataclasses.fields(config_cls)
            if f.init and _field_default(f) is dataclasses.MISSING and f.name not in values]


def _reject_unknown(parser: argparse.ArgumentParser, unknown: list[str]) -> None:
    """Exit with an argparse error that suggests the closest known flag."""
    known = [s for action in parser._actions for s in action.option_strings if "_" not in s]  # the dashed spellings
    flag = next((u.split("=", 1)[0] for u in unknown if u.startswith("-")), unknown[0])
    match = difflib.get_close_matches(flag, known, n=1)
    hint = f"; did you mean {match[0]}?" if match else ""
    parser.error(f"unrecognized argument: {' '.join(unknown)}{hint}")


def parse_config(config_cls: type[ConfigT], argv: list[str] | None = None, description: str = "") -> ConfigT:
    """Build a ``config_cls`` instance from command-line flags.

    Args:
        config_cls: A dataclass type; every init field becomes a flag.
        argv: Arguments to parse (``sys.argv[1:]`` when None).
        description: Text shown at the top of ``--help`` (the class docstring when empty).

    Returns:
        The config, with dataclass defaults for every flag not given.

    Raises:
        SystemExit: on ``--help``, an unknown flag, a bad value, or a value the dataclass's
            ``__post_init__`` rejects (argparse prints the message).
    """
    parser = build_parser(config_cls, description)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        _reject_unknown(parser, unknown)
    missing = _missing_required(config_cls, vars(namespace))
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    try:
        return config_cls(**_container_values(config_cls, vars(namespace)))
    except ValueError as error:
        parser.error(str(error))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a JSON-ready dict (tuples become lists, paths become strings)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as indented JSON to ``path``."""
    Path(path).write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n", encoding="utf-8")
