"""Training metrics: TensorBoard scalars, a ``metrics.jsonl`` history and PNG plots.

A run writes everything under ``<log_dir>/<run_name>/``:

- ``events.out.tfevents.*``: TensorBoard scalars tagged ``train/<name>`` and ``val/<name>``
  (e.g. ``train/loss``, ``train/rewards/accuracies``, ``val/loss``);
- ``metrics.jsonl``: one JSON object per :meth:`MetricsLogger.log` call, ``{"step": n, tag: value, ...}``
  (a step with training and validation metrics spans two lines; after ``--resume`` the steps restored from the
  checkpoint are written back one line per step, so read the file by merging the records of each step);
- ``<title>.png``: line plots written by :meth:`MetricsLogger.save_plots`.
"""

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

METRICS_FILE = "metrics.jsonl"
PlotSpec = tuple[str, Sequence[str]]


def plot_history(history: Sequence[Mapping[str, float]], tags: Sequence[str], path: str | Path, title: str) -> bool:
    """Draw one line per tag (value against step) and save it as a PNG.

    Uses matplotlib's object-oriented ``Figure`` (Agg canvas), so no display or global
    pyplot state is involved. Tags with no values are left out.

    Returns:
        True if a file was written, False if none of the tags has any value.
    """
    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    for tag in tags:
        points = [(record["step"], record[tag]) for record in history if tag in record]
        if points:
            steps, values = zip(*points)
            axes.plot(steps, values, label=tag, marker="." if len(points) < 50 else None)
    if not axes.lines:
        return False
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return True


def _file_name(title: str) -> str:
    """``"Reward margin"`` -> ``"reward_margin.png"``."""
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_") + ".png"


class MetricsLogger:
    """Write scalars to TensorBoard and ``metrics.jsonl`` and keep the per-step history.

    Args:
        log_dir: Root log directory.
        run_name: Sub-directory for this run.
        history: Records of a resumed run (from a checkpoint). ``metrics.jsonl`` is rewritten
            with them, and TensorBoard is told to drop events past their last step
            (``purge_step``), so steps replayed after a crash are not shown twice.

    Attributes:
        run_dir: ``log_dir / run_name``.
        history: One dict per step, ``{"step": n, "train/loss": ..., "val/loss": ...}``.
    """

    def __init__(self, log_dir: str | Path, run_name: str, history: Sequence[Mapping[str, float]] = ()) -> None:
        self.run_dir = Path(log_dir) / run_name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.history = [dict(record) for record in history]
        last_step = self.history[-1]["step"] if self.history else 0
        self._writer = SummaryWriter(str(self.run_dir), purge_step=last_step + 1)
        self._jsonl = open(self.run_dir / METRICS_FILE, "w", encoding="utf-8")
        for record in self.history:
            self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def log(self, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
        """Record ``metrics`` for ``step`` under the tags ``<split>/<name>``."""
        tagged = {f"{split}/{name}": float(value) for name, value in metrics.items()}
        for tag, value in tagged.items():
            self._writer.add_scalar(tag, value, step)
        self._jsonl.write(json.dumps({"step": step, **tagged}) + "\n")
        self._jsonl.flush()
        if self.history and self.history[-1]["step"] == step:
            self.history[-1].update(tagged)
        else:
            self.history.append({"step": step, **tagged})

    def plot(self, tags: Sequence[str], path: str | Path, title: str = "") -> bool:
        """Plot ``tags`` of the history to the PNG ``path``; see :func:`plot_history`."""
        return plot_history(self.history, tags, path, title or ", ".join(tags))

    def save_plots(self, specs: Sequence[PlotSpec], out_dir: str | Path | None = None) -> list[Path]:
        """Write one PNG per ``(title, tags)`` spec into ``out_dir`` (default: the run directory).

        Returns:
            The files written (specs whose tags have no values are skipped).
        """
        out_dir = Path(out_dir) if out_dir is not None else self.run_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for title, tags in specs:
            path = out_dir / _file_name(title)
            if self.plot(tags, path, title):
                written.append(path)
        return written

    def close(self) -> None:
        """Flush and close the TensorBoard writer and the jsonl file (safe to call twice)."""
        self._writer.close()
        self._jsonl.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
