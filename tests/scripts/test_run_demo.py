"""The README's first command in reduced form: the whole demo chain with a few steps per stage.

It runs ``scripts/run_demo.py --quick`` exactly as a user would (a subprocess in a scratch working directory,
so the demo's ./datasets, ./checkpoints and ./logs land there) and checks that every stage left its output
and that the report ends with the machine-readable DEMO line. CI thus catches a broken default anywhere in
the chain: assets, builders, trainers, merge, evaluation.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO_LINE = re.compile(r"^DEMO sft_pref_acc=([\d.]+) dpo_pref_acc=([\d.]+) sft_reward=([\d.]+) dpo_reward=([\d.]+)$")


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "run_demo.py"), "--quick"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    match = DEMO_LINE.match(last)
    assert match, last
    assert all(0.0 <= float(value) <= 1.0 for value in match.groups())
    for path in ("datasets/demo/sft/train.safetensors", "datasets/demo/preference/meta.json",
                 "checkpoints/demo/sft-merged/model.safetensors", "checkpoints/demo/dpo-merged/params.json",
                 "logs/demo-sft/loss.png", "logs/demo-dpo/reward_accuracy.png", "logs/demo-dpo/reference_check.json"):
        assert (tmp_path / path).is_file(), path
    assert list((tmp_path / "logs" / "demo-dpo").glob("events.out.tfevents.*"))
    assert (tmp_path / "logs" / "demo-extra-loss" / "metrics.jsonl").is_file()  # the extra loss's stage ran too


def test_a_rerun_removes_only_the_demos_earlier_outputs(tmp_path, monkeypatch, capsys):
    """The demo's datasets, checkpoints and logs/demo-* go (every stage then starts fresh, instead of refusing a
    checkpoint directory that is not empty); the user's other logs stay."""
    from scripts.run_demo import clean_previous_outputs

    monkeypatch.chdir(tmp_path)
    for path in ("datasets/demo/sft", "checkpoints/demo/sft-lora", "logs/demo-sft", "logs/my-run"):
        (tmp_path / path).mkdir(parents=True)
    clean_previous_outputs()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["checkpoints", "datasets", "logs",
                                                                                 "logs/my-run"]
    assert "removing previous demo output" in capsys.readouterr().out


@pytest.mark.parametrize(("stage_result", "status", "message"), [
    (subprocess.CompletedProcess([], 1), 1, ('error: stage "build the SFT dataset" failed (exit status 1, its '
                                             "output above says why)")),
    (KeyboardInterrupt(), 130, ('error: interrupted during "build the SFT dataset"; run the demo again (it starts '
                                "from scratch)")),
])
def test_a_failed_or_interrupted_stage_is_one_line(tmp_path, monkeypatch, capsys, stage_result, status, message):
    """No traceback: the stage printed its own error; the demo names the stage and exits 1 (failure) or 130."""
    from scripts import run_demo

    def stage(command, check):
        if isinstance(stage_result, BaseException):
            raise stage_result
        return stage_result

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_demo.subprocess, "run", stage)
    assert run_demo.main(["--quick"]) == status
    assert capsys.readouterr().err.strip() == message
