"""Bad input gets one clear line naming the field, the value and the fix (catalogue: docs/errors.md).

Each case runs the real code path (real files, real tokenizer) and asserts the message, and that
nothing was half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dynalign.cli import main
from dynalign.config import ConfigError
from tests.conftest import REPO, tiny_config


def _train_cli(capsys, *overrides: str) -> tuple[int, str]:
    code = main(["train", "--config", str(REPO / "configs/smoke.yaml"), "logging.progress=false", *overrides])
    err = capsys.readouterr().err.strip()
    return code, err


def test_missing_model_path_is_one_line(capsys, tmp_path):
    code, err = _train_cli(capsys, f"model.path={tmp_path / 'nope'}", f"run_dir={tmp_path / 'run'}")
    assert code == 2
    assert err.count("\n") == 0
    assert f"model.path = '{tmp_path / 'nope'}': no model there; run `dynalign make-tiny-model" in err
    assert not (tmp_path / "run").exists()  # refused before any work


def _load(config):
    from dynalign.data import load_prompts

    return load_prompts(config)


def test_prompts_file_missing_empty_malformed(tiny_model_path, tmp_path):
    cases = {
        "missing.jsonl": (None, "no such file; give a JSONL or Parquet file of prompts"),
        "empty.jsonl": ("", "the file holds no prompts"),
        "malformed.jsonl": ('{"prompt": "ok"}\n{not json\n', "could not be read"),
        "prompts.csv": ("prompt\nhello\n", "unsupported file type '.csv'; use .jsonl or .parquet"),
        "wrong_key.jsonl": ('{"text": "hello"}\n', "data.prompt_key = 'prompt': no such column"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        config = tiny_config(tiny_model_path, tmp_path / "run", f"data.prompts_path={path}")
        with pytest.raises(ConfigError) as err:
            _load(config)
        message = str(err.value)
        assert expected in message, (name, message)
        assert "\n" not in message
        assert message.startswith(("data.prompts_path", "data.prompt_key")), message


def test_long_prompts_skipped_and_counted_or_refused(tiny_model_path, tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"id": "short", "prompt": "Be kind."}, {"id": "long", "prompt": "word " * 400}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tiny_config(tiny_model_path, tmp_path / "run", f"data.prompts_path={path}", "data.max_prompt_tokens=64")
    stream = _load(config)
    assert [p for p, _ in stream.prompts] == ["short"]
    assert stream.skipped_too_long == 1

    config.data.on_long_prompt = "error"
    with pytest.raises(ConfigError, match=r"prompt 'long' is \d+ tokens, over data.max_prompt_tokens = 64; "
                                          r"raise the limit or set data.on_long_prompt=skip"):
        _load(config)


def test_tokenizer_without_chat_template(tiny_model_path, tmp_path):
    model_dir = tmp_path / "no-template"
    shutil.copytree(tiny_model_path, model_dir)
    for name in ("tokenizer_config.json", "chat_template.jinja", "chat_template.json"):
        file = model_dir / name
        if file.suffix == ".json" and file.is_file():
            data = json.loads(file.read_text())
            data.pop("chat_template", None)
            file.write_text(json.dumps(data))
        elif file.is_file():
            file.unlink()
    config = tiny_config(str(model_dir), tmp_path / "run")
    with pytest.raises(ConfigError, match="the tokenizer has no chat template; add one to tokenizer_config.json"):
        _load(config)


def test_resume_without_checkpoint_is_one_line(capsys, tiny_model_path, tmp_path):
    code = main(["train", "--config", str(REPO / "configs/smoke.yaml"), f"model.path={tiny_model_path}",
                 f"run_dir={tmp_path / 'run'}", "--resume", "latest"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == (f"dynalign: error: --resume latest: no complete checkpoint under {tmp_path / 'run' / 'checkpoints'}; "
                   "start without --resume")


def test_errors_catalogue_lists_every_case():
    catalogue = (REPO / "docs" / "errors.md").read_text()
    for case in ("unknown config key", "wrong type", "out of range", "missing model path", "chat template",
                 "prompts file", "longer than", "unparseable judge", "NaN or infinite loss", "zero reward variance",
                 "disk full", "resources"):
        assert case in catalogue, case
    for test_name in ("test_missing_model_path_is_one_line", "test_full_disk_leaves_no_partial_checkpoint"):
        assert test_name in catalogue
    assert Path(REPO / "tests" / "test_reliability.py").is_file()
