"""Typed config: validation messages, precedence, the `dynalign config` / `train` commands."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dynalign import cli
from dynalign.config import ConfigError, TrainConfig, describe, load_config, to_yaml
from tests.conftest import REPO


def write_yaml(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def leaf_keys(cls: type = TrainConfig, prefix: str = "") -> set[str]:
    keys = set()
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys |= leaf_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.add(f"{prefix}{f.name}")
    return keys


def error_of(yaml_path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(yaml_path, overrides)
    message = str(info.value)
    assert "\n" not in message, "config errors must be one line"
    return message


# --- bad values, from YAML ---------------------------------------------------------------------

def test_typo_key_from_yaml_names_key_source_and_suggestion(tmp_path):
    path = write_yaml(tmp_path, "learner:\n  lrr: 1.0e-5\n")
    assert error_of(path) == f"unknown key 'learner.lrr' (from {path}); did you mean 'learner.lr'?"


def test_wrong_type_from_yaml(tmp_path):
    path = write_yaml(tmp_path, "learner:\n  micro_batch_size: four\n")
    assert error_of(path) == f"learner.micro_batch_size = 'four' (from {path}) must be an integer"


def test_float_where_int_expected_is_refused(tmp_path):
    path = write_yaml(tmp_path, "rollout:\n  group_size: 2.5\n")
    assert error_of(path) == f"rollout.group_size = 2.5 (from {path}) must be an integer"


def test_out_of_range_from_yaml(tmp_path):
    path = write_yaml(tmp_path, "learner:\n  zero_stage: 4\n")
    assert error_of(path) == (
        f"learner.zero_stage = 4 (from {path}) is out of range; allowed: >= 0 and <= 3")


def test_exclusive_lower_bound(tmp_path):
    path = write_yaml(tmp_path, "rollout:\n  temperature: 0\n")
    assert error_of(path) == (
        f"rollout.temperature = 0 (from {path}) is out of range; allowed: > 0")


def test_literal_choice_lists_allowed_values(tmp_path):
    path = write_yaml(tmp_path, "judge:\n  kind: oracle\n")
    assert error_of(path) == f"judge.kind = 'oracle' (from {path}) must be one of policy, rule, external_vllm, openai"


def test_unknown_section_lists_known_keys(tmp_path):
    path = write_yaml(tmp_path, "optimizer:\n  lr: 1.0\n")
    message = error_of(path)
    assert message.startswith(f"unknown key 'optimizer' (from {path}); known keys: ")
    for section in ("model", "data", "rollout", "judge", "learner", "sync", "cluster"):
        assert section in message


def test_section_given_a_scalar(tmp_path):
    path = write_yaml(tmp_path, "learner: 3\n")
    assert error_of(path) == (
        f"learner = 3 (from {path}) must be a mapping of options of section 'learner'")


def test_missing_and_invalid_yaml_files(tmp_path):
    assert error_of(tmp_path / "absent.yaml") == f"--config {tmp_path / 'absent.yaml'}: no such file"
    bad = write_yaml(tmp_path, "learner: [1, 2\n", "bad.yaml")
    assert error_of(bad) == f"--config {bad} line 2, column 1: did not find expected ',' or ']'"
    duplicate = write_yaml(tmp_path, "iterations: 2\niterations: 3\n", "dup.yaml")
    assert error_of(duplicate) == f"--config {duplicate} line 2, column 1: found duplicate key 'iterations'"
    tab = write_yaml(tmp_path, "learner:\n\tlr: 1.0\n", "tab.yaml")
    assert error_of(tab) == (f"--config {tab} line 2, column 1: found character that cannot start any token "
                             "(a tab: indent with spaces)")
    listing = write_yaml(tmp_path, "- 1\n- 2\n", "list.yaml")
    assert error_of(listing) == f"--config {listing}: expected a mapping of options at the top level"


def test_empty_yaml_means_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, "")) == TrainConfig()


# --- bad values, from the command line ---------------------------------------------------------

def test_typo_key_from_command_line():
    assert error_of(overrides=["rollout.group_sise=4"]) == (
        "unknown key 'rollout.group_sise' (from command line); did you mean 'rollout.group_size'?")


def test_wrong_type_from_command_line():
    assert error_of(overrides=["learner.lr=fast"]) == (
        "learner.lr = 'fast' (from command line) must be a number")
    assert error_of(overrides=["data.shuffle=maybe"]) == (
        "data.shuffle = 'maybe' (from command line) must be true or false")


def test_out_of_range_from_command_line():
    assert error_of(overrides=["rollout.top_p=1.5"]) == (
        "rollout.top_p = 1.5 (from command line) is out of range; allowed: > 0 and <= 1")


def test_override_without_equals_sign():
    assert error_of(overrides=["learner.lr"]) == (
        "override 'learner.lr' (command line): expected key=value, e.g. learner.lr=1e-5")


# --- precedence ------------------------------------------------------------------------------

def test_precedence_command_line_beats_yaml_beats_defaults(tmp_path):
    defaults = TrainConfig()
    path = write_yaml(tmp_path, "iterations: 5\nlearner:\n  lr: 3.0e-4\n  zero_stage: 3\n")
    config = load_config(path, ["learner.lr=1e-3", "rollout.group_size=4"])
    assert config.learner.lr == 1e-3  # command line over YAML
    assert config.learner.zero_stage == 3  # YAML over default
    assert config.iterations == 5  # YAML over default
    assert config.rollout.group_size == 4  # command line over default
    assert config.rollout.max_new_tokens == defaults.rollout.max_new_tokens  # default kept
    assert config.judge == defaults.judge


def test_later_override_wins_and_types_are_coerced():
    config = load_config(None, ["learner.lr=1", "learner.lr=2e-5", "cluster.num_cpus=2"])
    assert config.learner.lr == 2e-5 and isinstance(config.learner.lr, float)
    assert config.cluster.num_cpus == 2
    assert load_config(None, ["cluster.num_cpus=null"]).cluster.num_cpus is None


def test_resolved_yaml_round_trips(tmp_path):
    config = load_config(None, ["learner.lr=2e-5", "cluster.address=ray://head:10001"])
    path = write_yaml(tmp_path, to_yaml(config))
    assert load_config(path) == config


# --- cross-field checks -------------------------------------------------------------------------

def test_cross_field_score_range():
    assert error_of(overrides=["judge.score_min=5", "judge.score_max=5"]) == (
        "judge.score_min = 5 must be below judge.score_max = 5")


def test_cross_field_batch_divisibility():
    # 3 prompts x 8 candidates = 24 samples; 2 ranks x 4 x 1 = 8 per update -> fine.
    load_config(None, ["data.prompts_per_iteration=3"])
    message = error_of(overrides=["data.prompts_per_iteration=3", "learner.micro_batch_size=5"])
    assert message.startswith("data.prompts_per_iteration * rollout.group_size = 24 must be a multiple of")
    assert "learner.num_ranks * learner.micro_batch_size * learner.updates_per_iteration = 10" in message


@pytest.mark.parametrize("cpu_bf16", [True, False])
def test_engine_dtype_auto_picks_bf16_only_where_it_runs_natively(cpu_bf16, monkeypatch):
    # The CPU without bf16 kernels is this machine (AVX2 only); the one with them is faked.
    monkeypatch.setattr("dynalign.config.cpu_has_native_bf16", lambda: cpu_bf16)
    assert load_config(None, []).engine_dtype == ("bfloat16" if cpu_bf16 else "float32")
    assert load_config(None, ["rollout.num_gpus_per_worker=1"]).engine_dtype == "bfloat16"
    for explicit in ("bfloat16", "float16", "float32"):
        assert load_config(None, [f"model.dtype={explicit}"]).engine_dtype == explicit
    assert error_of(overrides=["model.dtype=fp8"]).startswith("model.dtype = 'fp8'")


@pytest.mark.parametrize("cpu_bf16", [True, False])
def test_learner_dtype_auto_picks_bf16_only_where_bf16_matmuls_run_in_hardware(cpu_bf16, monkeypatch):
    monkeypatch.setattr("dynalign.config.cpu_has_bf16_matmul", lambda: cpu_bf16)
    assert load_config(None, []).learner_dtype == "float32"  # the default stays float32 everywhere
    assert load_config(None, ["model.learner_dtype=auto"]).learner_dtype == ("bfloat16" if cpu_bf16 else "float32")
    assert load_config(None, ["model.learner_dtype=auto", "learner.num_gpus_per_rank=1"]).learner_dtype == "bfloat16"
    assert load_config(None, ["model.learner_dtype=bfloat16"]).learner_dtype == "bfloat16"
    assert error_of(overrides=["model.learner_dtype=fp16"]).startswith("model.learner_dtype = 'fp16'")


def test_attention_kernel_option():
    assert load_config(None, []).model.attn_implementation == "sdpa"  # transformers' own default
    assert load_config(REPO / "configs/smollm2_cpu.yaml").model.attn_implementation == "eager"
    assert error_of(overrides=["model.attn_implementation=flash"]) == (
        "model.attn_implementation = 'flash' (from command line) must be one of sdpa, eager, flash_attention_2")


def test_check_is_called_on_direct_construction():
    config = TrainConfig()
    config.check()  # defaults are consistent
    config.judge.score_min = 9
    with pytest.raises(ConfigError, match="judge.score_min = 9 must be below judge.score_max = 5"):
        config.check()


# --- describe() ---------------------------------------------------------------------------------

def test_describe_covers_every_field_with_a_doc():
    rows = describe()
    keys = [key for key, _, _ in rows]
    assert len(keys) == len(set(keys))
    assert set(keys) == leaf_keys()
    defaults = OmegaConf.create(dataclasses.asdict(TrainConfig()))
    for key, default, doc in rows:
        assert doc.strip(), f"{key} has no doc"
        assert "\n" not in doc, f"{key}: doc must be one line"
        assert OmegaConf.select(defaults, key) == default, key


# --- the command line -------------------------------------------------------------------------

def test_cli_config_prints_resolved_yaml(tmp_path, capsys):
    path = write_yaml(tmp_path, "learner:\n  zero_stage: 3\n")
    assert cli.main(["config", "--config", str(path), "rollout.group_size=4"]) == 0
    out = capsys.readouterr().out
    resolved = OmegaConf.to_container(OmegaConf.create(out))
    assert resolved["learner"]["zero_stage"] == 3
    assert resolved["rollout"]["group_size"] == 4
    assert resolved["learner"]["lr"] == TrainConfig().learner.lr


def test_cli_overrides_may_come_before_options(tmp_path, capsys):
    path = write_yaml(tmp_path, "iterations: 3\n")
    assert cli.main(["config", "seed=7", "--config", str(path), "iterations=4"]) == 0
    resolved = OmegaConf.create(capsys.readouterr().out)
    assert resolved.seed == 7 and resolved.iterations == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["config", "learner.lrr=1"],
         "dynalign: error: unknown key 'learner.lrr' (from command line); did you mean 'learner.lr'?"),
        (["config", "learner.zero_stage=7"],
         "dynalign: error: learner.zero_stage = 7 (from command line) is out of range; allowed: >= 0 and <= 3"),
        (["train", "--config", "no/such/file.yaml"],
         "dynalign: error: --config no/such/file.yaml: no such file"),
    ],
)
def test_cli_config_error_is_one_line_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [message]
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_cli_config_error_from_yaml(tmp_path, capsys):
    path = write_yaml(tmp_path, "rollout:\n  group_size: 1\n")
    assert cli.main(["config", "--config", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"dynalign: error: rollout.group_size = 1 (from {path}) is out of range; allowed: >= 2"]


def test_cli_config_doc_lists_every_option(capsys):
    assert cli.main(["config", "--doc"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert [cell.strip() for cell in lines[0].split("|")[1:4]] == ["key", "default", "doc"]
    listed = {line.split("|")[1].strip().strip("`") for line in lines[2:]}
    assert listed == leaf_keys()
    assert "`learner.zero_stage`" in out and "DeepSpeed ZeRO stage" in out


def test_cli_help_lists_subcommands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "config", "make-tiny-model"):
        assert command in out


def test_cli_unknown_subcommand_is_usage_error(capsys):
    assert cli.main(["fly"]) == 2
    assert "invalid choice: 'fly'" in capsys.readouterr().err


@pytest.fixture
def fake_driver(monkeypatch):
    """Replace dynalign.driver with a stub that records what `train` received."""
    calls = []
    module = types.ModuleType("dynalign.driver")

    def train(config, resume=None, overwrite=False):
        calls.append((config, resume))

    module.train = train
    monkeypatch.setitem(sys.modules, "dynalign.driver", module)
    return calls


def test_cli_train_passes_resolved_config_and_resume(tmp_path, fake_driver):
    path = write_yaml(tmp_path, "iterations: 3\n")
    assert cli.main(["train", "--config", str(path), "learner.lr=2e-5"]) == 0
    (config, resume), = fake_driver
    assert isinstance(config, TrainConfig)
    assert config.iterations == 3 and config.learner.lr == 2e-5
    assert resume is None


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--resume"], "latest"),
        (["--resume", "latest"], "latest"),
        (["--resume", "outputs/run/checkpoints/iter_2"], "outputs/run/checkpoints/iter_2"),
        (["--resume", "seed=3"], "latest"),  # an override after a bare --resume stays an override
    ],
)
def test_cli_train_resume_flag(extra, expected, fake_driver):
    assert cli.main(["train", *extra]) == 0
    (config, resume), = fake_driver
    assert resume == expected
    if "seed=3" in extra:
        assert config.seed == 3


def test_cli_train_bad_config_never_reaches_driver(fake_driver, capsys):
    assert cli.main(["train", "iterations=0"]) == 2
    assert fake_driver == []
    assert capsys.readouterr().err.splitlines() == [
        "dynalign: error: iterations = 0 (from command line) is out of range; allowed: >= 1"]


def test_cli_train_file_not_found_is_one_line(monkeypatch, capsys):
    module = types.ModuleType("dynalign.driver")

    def train(config, resume=None, overwrite=False):
        raise FileNotFoundError(2, "No such file or directory", config.data.prompts_path)

    module.train = train
    monkeypatch.setitem(sys.modules, "dynalign.driver", module)
    assert cli.main(["train", "data.prompts_path=missing.jsonl"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "dynalign: error: missing.jsonl: No such file or directory; check the path and its permissions"]
