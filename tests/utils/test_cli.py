"""Tests for dpo_llama.utils.cli: dataclass -> command line, and config JSON."""

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from dpo_llama.configs.base import TrainConfig
from dpo_llama.utils.cli import (HelpFormatter, add_bool_flag, add_max_shard_gb, at_least, check_output_directory,
                                 config_to_dict, parse_config, probability, save_config)


@dataclass
class ToyConfig:
    name: str = field(default="run", metadata={"help": "Run name."})
    steps: int = field(default=10, metadata={"help": "Number of steps."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak lr (100% at the end of warmup)."})
    use_cache: bool = field(default=False, metadata={"help": "Cache things."})
    enabled: bool = field(default=True, metadata={"help": "Turn it on."})
    max_length: Optional[int] = field(default=None, metadata={"help": "Truncate to this many tokens."})
    eval_split: str | None = field(default="val", metadata={"help": "Split used for evaluation."})
    dtype: Literal["bf16", "fp32"] = field(default="bf16", metadata={"help": "Compute dtype."})
    stop_words: list[str] = field(default_factory=lambda: ["</s>"], metadata={"help": "Stop strings."})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "Adam betas."})
    layers: tuple[int, ...] = field(default=(0, 1), metadata={"help": "Layers to adapt."})


def parse(*argv: str) -> ToyConfig:
    return parse_config(ToyConfig, list(argv))


def test_defaults_without_flags():
    assert parse() == ToyConfig()
    assert parse_config(TrainConfig, []) == TrainConfig()


@pytest.mark.parametrize("flag", ["--max-length", "--max_length"])
def test_both_spellings(flag):
    assert parse(flag, "7").max_length == 7


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--use-cache"], True),
        (["--use_cache"], True),
        (["--use-cache", "true"], True),
        (["--use-cache", "FALSE"], False),
        (["--use_cache", "yes"], True),
        (["--use-cache", "0"], False),
        (["--use-cache", "--steps", "3"], True),
    ],
)
def test_bool_flag_forms(argv, expected):
    assert parse(*argv).use_cache is expected


@pytest.mark.parametrize("flag", ["--no-enabled", "--no_enabled"])
def test_negated_bool(flag):
    assert parse(flag).enabled is False


@pytest.mark.parametrize(("argv", "expected"), [([], True), (["--fast-path"], True), (["--fast-path", "no"], False),
                                                 (["--no-fast-path"], False), (["--no_fast_path"], False)])
def test_add_bool_flag_gives_a_script_the_config_flags_forms(argv, expected):
    """A script's own bool flag (add_bool_flag) takes the forms a config's bool field does, with its default."""
    parser = argparse.ArgumentParser()
    add_bool_flag(parser, "fast_path", "a bool", default=True)
    assert parser.parse_args(argv).fast_path is expected


def test_optional_values():
    assert parse("--max-length", "none").max_length is None
    assert parse("--max-length", "None", "--eval-split", "NONE").eval_split is None
    assert parse("--eval-split", "test").eval_split == "test"


def test_lists_and_tuples():
    cfg = parse("--stop-words", "a", "b c", "--betas", "0.8", "0.99", "--layers", "3")
    assert cfg.stop_words == ["a", "b c"]
    assert cfg.betas == (0.8, 0.99)
    assert cfg.layers == (3,)


def test_optional_lists_and_tuples_take_none_alone(capsys):
    @dataclass
    class Containers:
        layers: Optional[list[int]] = field(default_factory=lambda: [1])
        pair: tuple[int, int] | None = (1, 2)

    assert parse_config(Containers, ["--layers", "none", "--pair", "NONE"]) == Containers(None, None)
    assert parse_config(Containers, ["--layers", "3", "4", "--pair", "5", "6"]) == Containers([3, 4], (5, 6))
    for argv, message in ((["--layers", "3", "none"], "'none' must be its only value"),
                          (["--pair", "5"], "--pair: expected 2 values, got 1")):
        with pytest.raises(SystemExit):
            parse_config(Containers, argv)
        assert message in capsys.readouterr().err


def test_choices_are_validated(capsys):
    assert parse("--dtype", "fp32").dtype == "fp32"
    with pytest.raises(SystemExit):
        parse("--dtype", "fp16")
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv", [["--steps", "ten"], ["--use-cache", "maybe"], ["--betas", "0.9"], ["--learning-rate", "x"]]
)
def test_bad_values_are_argparse_errors(argv):
    with pytest.raises(SystemExit):
        parse(*argv)


def test_unknown_flag_suggests_the_closest(capsys):
    with pytest.raises(SystemExit):
        parse("--step", "3")
    err = capsys.readouterr().err
    assert "unrecognized argument: --step 3" in err
    assert "did you mean --steps?" in err


def test_help_lists_every_field_with_type_default_and_help(capsys):
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, ["--help"], description="Toy trainer.")
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "Toy trainer." in out
    for f in dataclasses.fields(ToyConfig):
        assert f"--{f.name.replace('_', '-')}" in out
        assert f.metadata["help"] in out
    assert "(type: int, default: 10)" in out
    assert "(type: float, default: 0.001)" in out
    assert "{bf16,fp32}" in out and "(type: choice, default: 'bf16')" in out
    assert "default: ['</s>']" in out and "default: (0.9, 0.95)" in out
    assert "--no-enabled" in out


def test_train_config_help_documents_every_field(capsys):
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"TrainConfig.{f.name} has no help"
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--help"])
    out = capsys.readouterr().out
    assert all(f"--{f.name.replace('_', '-')}" in out for f in dataclasses.fields(TrainConfig))
    assert "{adamw,adamw_8bit,paged_adamw_8bit}" in out


def test_train_config_flags_and_validation(capsys):
    cfg = parse_config(TrainConfig, ["--adam-betas", "0.8", "0.9", "--optimizer", "paged_adamw_8bit",
                                     "--no-mixed-precision", "--max_train_steps", "7"])
    assert (cfg.adam_betas, cfg.optimizer, cfg.mixed_precision, cfg.max_train_steps) == (
        (0.8, 0.9), "paged_adamw_8bit", False, 7)
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--min-lr-ratio", "2"])
    assert "min_lr_ratio must be in [0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--grad-clip", "nan"], "grad_clip must be finite"),
    (["--learning-rate", "inf"], "learning_rate must be finite"),
    (["--adam-betas", "0.9", "nan"], "adam_betas must be finite"),
    (["--run-name", ""], "run_name must not be empty"),
    (["--seed", "-1"], "seed must be in [0, 2**32)"),
    (["--seed", "4294967296"], "seed must be in [0, 2**32)"),
    (["--grad-clip", "-1"], "grad_clip must be >= 0"),  # would turn clipping off unnoticed
    (["--adam-betas", "0.9", "1.0"], "adam_betas must be two values in [0, 1)"),
    (["--adam-eps", "0"], "adam_eps must be > 0"),
    (["--log-interval", "0"], "log_interval must be >= 1"),
    (["--ckpt-dir", ""], "ckpt_dir must not be empty"),  # would write checkpoints into the working directory
])
def test_train_config_refuses_non_finite_empty_and_out_of_range_values(capsys, argv, message):
    """NaN passes every < / > check (grad clipping silently off, a loss that turns NaN steps later): refused."""
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, argv)
    assert message in capsys.readouterr().err


def test_at_least_parses_and_bounds_numbers():
    assert at_least(2)("7") == 7 and at_least(1e-6, float)("0.5") == 0.5
    for parse, text in ((at_least(2), "1"), (at_least(2), "x"), (at_least(0.0, float), "nan")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_probability_is_a_number_from_0_to_1():
    assert probability("0") == 0.0 and probability("1") == 1.0 and probability("0.25") == 0.25
    for text in ("1.5", "-0.1", "nan", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            probability(text)


def test_required_field_and_unsupported_type():
    @dataclass
    class Required:
        path: str = field(metadata={"help": "Input file."})

    @dataclass
    class RequiredPair:
        data_dir: str = field(metadata={"help": "Input directory."})

    with pytest.raises(SystemExit):
        parse_config(Required, [])
    assert parse_config(Required, ["--path", "a.pkl"]).path == "a.pkl"
    assert parse_config(RequiredPair, ["--data_dir", "x"]).data_dir == "x"  # either spelling counts

    @dataclass
    class Unsupported:
        table: dict = field(default_factory=dict)

    with pytest.raises(TypeError, match="table"):
        parse_config(Unsupported, [])


def test_config_json_round_trip(tmp_path):
    """The saved JSON holds every field; tuples as lists, which parse back to the same config."""
    cfg = parse("--betas", "0.5", "0.6", "--max-length", "12")
    assert config_to_dict(cfg)["betas"] == [0.5, 0.6]
    save_config(cfg, tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == config_to_dict(cfg)
    assert ToyConfig(**{**saved, "betas": tuple(saved["betas"]), "layers": tuple(saved["layers"])}) == cfg


def test_max_shard_gb_is_parsed_into_bytes():
    """--max-shard-gb 0.5 -> 0.5 · 2³⁰ = 536870912 bytes; 4 GiB by default; 0 is refused."""
    parser = argparse.ArgumentParser()
    add_max_shard_gb(parser)
    assert parser.parse_args(["--max-shard-gb", "0.5"]).max_shard_bytes == 536870912
    assert parser.parse_args([]).max_shard_bytes == 4 * 1024**3
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-shard-gb", "0"])


def test_an_output_over_an_input_directory_is_refused(tmp_path):
    """Every input the output resolves to is named; distinct directories pass."""
    check_output_directory(tmp_path / "out", base=tmp_path / "base", lora=tmp_path / "lora")
    with pytest.raises(ValueError, match="must differ from --lora "):
        check_output_directory(tmp_path / "x" / ".." / "lora", base=tmp_path / "base", lora=tmp_path / "lora")
    with pytest.raises(ValueError, match="must differ from --base and --lora"):
        check_output_directory(tmp_path, base=tmp_path, lora=tmp_path)


def test_an_output_where_a_file_is_in_the_way_is_refused(tmp_path):
    """--output a file, or under one: refused before any work (the write would fail at the end)."""
    (tmp_path / "f").write_text("")
    for output in (tmp_path / "f", tmp_path / "f" / "sub" / "dir"):
        with pytest.raises(ValueError, match=f"--output {output}: {tmp_path / 'f'} is a file, not a directory"):
            check_output_directory(output)
    check_output_directory(tmp_path / "new" / "dir")


def test_script_help_shows_defaults_once():
    """HelpFormatter appends a default only where the help names none and there is one to show."""
    parser = argparse.ArgumentParser(description="line one\n  keep   this", formatter_class=HelpFormatter)
    parser.add_argument("--seed", type=int, default=42, help="split seed")
    parser.add_argument("--output", default="out", help="where (default: the demo's)")
    parser.add_argument("--lora", default=None, help="an adapter")
    parser.add_argument("--fast", action="store_true", help="go fast")
    text = parser.format_help()
    assert "split seed (default: 42)" in text and "(default: the demo's)" in text and "default: out" not in text
    assert "an adapter\n" in text and "go fast\n" in text and "  keep   this" in text
