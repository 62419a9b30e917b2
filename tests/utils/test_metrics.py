"""Tests for dpo_llama.utils.metrics."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dpo_llama.utils.metrics import MetricsLogger, plot_history

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def scalars(run_dir):
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_log_writes_exact_tags_jsonl_and_merged_history(tmp_path):
    with MetricsLogger(tmp_path, "dpo") as logger:
        logger.log(1, {"loss": 0.7, "rewards/accuracies": 0.5})
        logger.log(2, {"loss": 0.6, "rewards/accuracies": 0.75})
        logger.log(2, {"loss": 0.65}, split="val")

    run_dir = tmp_path / "dpo"
    assert scalars(run_dir) == {
        "train/loss": [(1, pytest.approx(0.7)), (2, pytest.approx(0.6))],
        "train/rewards/accuracies": [(1, 0.5), (2, 0.75)],
        "val/loss": [(2, pytest.approx(0.65))],
    }
    assert read_jsonl(run_dir / "metrics.jsonl") == [
        {"step": 1, "train/loss": 0.7, "train/rewards/accuracies": 0.5},
        {"step": 2, "train/loss": 0.6, "train/rewards/accuracies": 0.75},
        {"step": 2, "val/loss": 0.65},
    ]
    assert logger.history == [
        {"step": 1, "train/loss": 0.7, "train/rewards/accuracies": 0.5},
        {"step": 2, "train/loss": 0.6, "train/rewards/accuracies": 0.75, "val/loss": 0.65},
    ]


def test_resumed_logger_rewrites_jsonl_from_history(tmp_path):
    with MetricsLogger(tmp_path, "run") as logger:
        for step in (1, 2, 3):
            logger.log(step, {"loss": float(step)})
    checkpoint_history = logger.history[:2]  # the run crashed after step 3, last checkpoint at 2

    with MetricsLogger(tmp_path, "run", history=checkpoint_history) as resumed:
        resumed.log(3, {"loss": 30.0})

    assert [r["train/loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1.0, 2.0, 30.0]
    assert [r["train/loss"] for r in resumed.history] == [1.0, 2.0, 30.0]
    # TensorBoard drops the crashed run's step 3 (purge_step): one value per step, the replayed one
    assert scalars(tmp_path / "run")["train/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_each_record_reaches_the_jsonl_file_at_once(tmp_path):
    """A crash loses no logged step: metrics.jsonl holds each record as soon as it is logged, before close()."""
    logger = MetricsLogger(tmp_path, "run")
    logger.log(1, {"loss": 0.5})
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl") == [{"step": 1, "train/loss": 0.5}]
    logger.close()


def test_save_plots_writes_one_png_per_spec_and_skips_empty_ones(tmp_path):
    logger = MetricsLogger(tmp_path, "sft")
    for step in range(1, 6):
        logger.log(step, {"loss": 1.0 / step, "rewards/margins": 0.1 * step})
    logger.log(5, {"loss": 0.3}, split="val")

    written = logger.save_plots([
        ("Loss", ["train/loss", "val/loss"]),
        ("Reward margin", ["train/rewards/margins"]),
        ("Nothing logged", ["train/absent"]),
    ])
    logger.close()
    logger.close()  # closing twice is harmless

    assert written == [tmp_path / "sft" / "loss.png", tmp_path / "sft" / "reward_margin.png"]
    for path in written:
        assert path.read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "sft" / "nothing_logged.png").exists()


def test_plot_history_to_any_path(tmp_path):
    history = [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.0}]
    assert plot_history(history, ["train/loss"], tmp_path / "custom.png", "loss")
    assert (tmp_path / "custom.png").read_bytes()[:8] == PNG_MAGIC
    assert not plot_history(history, ["val/loss"], tmp_path / "none.png", "val")
