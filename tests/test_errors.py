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
        "malformed.jsonl": ('{"prompt": "ok"}\n{not json\n', "line 2 is not valid JSON (Expecting property name"),
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


# --- the catalogue: every refusal is exit 2, one line, no traceback, nothing touched, no Ray -------

def _snapshot(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def earlier_run(tiny_model_path, tmp_path_factory) -> Path:
    """A finished run's directory (its logs, final policy and two checkpoints, the newer damaged),
    as a failed second run into the same run_dir must leave it."""
    from dynalign import checkpoint

    run_dir = tmp_path_factory.mktemp("earlier") / "run"
    run_dir.mkdir()
    metrics = [{"iteration": i, "reward_mean": 1.0 + i, "reward_min": 0.0, "reward_max": 2.0 + i} for i in range(2)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run_dir / "summary.json").write_text(json.dumps({"iterations": 2, "reward_mean_per_iteration": [1.0, 2.0]}))
    (run_dir / "prompt_ids.jsonl").write_text('{"iteration": 0, "prompt_ids": ["a"]}\n{"iteration": 1, "prompt_ids": ["b"]}\n')
    (run_dir / "config.yaml").write_text("iterations: 2\n")
    shutil.copytree(tiny_model_path, run_dir / "policy")
    for iteration in (0, 1):
        ckpt = checkpoint.checkpoint_root(run_dir) / f"iter_{iteration:06d}"
        (ckpt / "learner").mkdir(parents=True)
        (ckpt / "learner" / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * 64)
        checkpoint.write_json(ckpt / "state.json", {"iteration": iteration})
        files = {str(p.relative_to(ckpt)): checkpoint.file_record(p) for p in sorted(ckpt.rglob("*")) if p.is_file()}
        checkpoint.write_json(ckpt / checkpoint.MANIFEST, {"iteration": iteration, "files": files})
    damaged = checkpoint.checkpoint_root(run_dir) / "iter_000001" / "learner" / "mp_rank_00_model_states.pt"
    damaged.write_bytes(b"\xff" + damaged.read_bytes()[1:])  # same size, one byte changed
    return run_dir


def _spec(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _catalogue_cases(run: Path, model: str, tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    """case -> (dynalign arguments, fragments the one-line error must hold: option or file, value, fix)."""
    train = ["train", "--config", str(REPO / "configs/smoke.yaml"), f"model.path={model}", f"run_dir={run}",
             f"judge.value_spec={REPO / 'configs/values/collective_agency.yaml'}", "logging.progress=false"]
    a_file = _spec(tmp, "a_file", "not a directory\n")
    broken = _spec(tmp, "broken.jsonl", "".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(3)) + "{oops\n")
    no_pillars = _spec(tmp, "no_pillars.yaml", "name: X\ndescription: y\n")
    no_format = _spec(tmp, "no_format.yaml", "name: X\ndescription: y\npillars: [{name: P, description: q}]\n"
                                             "rubric:\n  templates:\n    generate:\n      system: 'Rate {criteria}'\n")
    bad_yaml = _spec(tmp, "bad_spec.yaml", "name: [X\n")
    duplicate = _spec(tmp, "dup.yaml", "iterations: 2\niterations: 3\n")
    tabbed = _spec(tmp, "tab.yaml", "learner:\n\tlr: 1.0\n")
    checkpoints = run / "checkpoints"
    return {
        "run_dir holds a run": (train, [f"run_dir = '{run}' holds a run", "metrics.jsonl", "--resume", "--overwrite"]),
        "missing prompts file": ([*train, f"data.prompts_path={run / 'nope.jsonl'}"],
                                 ["data.prompts_path", "nope.jsonl", "no such file"]),
        "broken JSONL line": ([*train, f"data.prompts_path={broken}"], ["data.prompts_path", "line 4 is not valid JSON"]),
        "infinite lr": ([*train, "learner.lr=.inf"], ["learner.lr = inf", "must be a finite number"]),
        "NaN float": ([*train, "judge.temperature=.nan"], ["judge.temperature = nan", "must be a finite number"]),
        "damaged checkpoint": ([*train, "--resume", str(checkpoints / "iter_000001")],
                               ["iter_000001/learner/mp_rank_00_model_states.pt does not match its checksum",
                                f"--resume {checkpoints / 'iter_000000'}"]),
        "unwritable run_dir": ([*train, "run_dir=/sys/dynalign-x"], ["run_dir = '/sys/dynalign-x'", "cannot write there"]),
        "run_dir is a file": ([*train, f"run_dir={a_file}"], ["run_dir", "a_file", "a file is in the way"]),
        "unwritable report --out": (["report", str(run), "--out", "/sys/dynalign-x"],
                                    ["report --out = '/sys/dynalign-x'", "cannot write there"]),
        "report --out is a file": (["report", str(run), "--out", str(a_file)], ["report --out", "a file is in the way"]),
        "unwritable make-tiny-model": (["make-tiny-model", "/sys/dynalign-x"], ["make-tiny-model /sys/dynalign-x", "writable"]),
        "make-tiny-model over files": (["make-tiny-model", str(run)], ["holds files but no model", "--overwrite"]),
        "missing value spec (train)": ([*train, f"judge.value_spec={tmp / 'absent.yaml'}"],
                                       ["judge.value_spec", "absent.yaml", "no such file"]),
        "missing value spec (config)": (["config", f"judge.value_spec={tmp / 'absent.yaml'}"],
                                        ["judge.value_spec", "absent.yaml", "no such file"]),
        "spec without pillars": ([*train, f"judge.value_spec={no_pillars}"], ["no_pillars.yaml", "missing 'pillars'"]),
        "template without {format}": (["config", f"judge.value_spec={no_format}"], ["no_format.yaml", "{format}"]),
        "score_max the rubric does not add up to": ([*train, "judge.score_max=7"],
                                                    ["rubric.criteria add up to 5 points", "spans 7"]),
        "malformed spec YAML": ([*train, f"judge.value_spec={bad_yaml}"], ["bad_spec.yaml line 2, column 1"]),
        "duplicate YAML key": (["train", "--config", str(duplicate), f"run_dir={run}"],
                               [f"{duplicate} line 2, column 1: found duplicate key 'iterations'"]),
        "tab in YAML": (["config", "--config", str(tabbed)], [f"{tabbed} line 2, column 1", "tab"]),
        "two --config files": (["train", "--config", str(duplicate), "--config", str(REPO / "configs/smoke.yaml"),
                                f"run_dir={run}"], ["--config given 2 times", "key=value"]),
        "one adam beta": ([*train, "learner.adam_betas=[0.9]"], ["learner.adam_betas = [0.9]", "two numbers in [0, 1)"]),
        "adam beta above 1": ([*train, "learner.adam_betas=[1.5,0.999]"], ["learner.adam_betas = [1.5, 0.999]", "[0, 1)"]),
        "context too short": ([*train, "rollout.max_model_len=64"], ["rollout.max_model_len = 64", "needs 144"]),
    }


def _refuse_ray():
    raise RuntimeError("ray.init called: the input should have been refused before")


CATALOGUE_CASES = ["run_dir holds a run", "missing prompts file", "broken JSONL line", "infinite lr", "NaN float",
                   "damaged checkpoint", "unwritable run_dir", "run_dir is a file", "unwritable report --out",
                   "report --out is a file", "unwritable make-tiny-model", "make-tiny-model over files",
                   "missing value spec (train)", "missing value spec (config)", "spec without pillars",
                   "template without {format}", "score_max the rubric does not add up to", "malformed spec YAML",
                   "duplicate YAML key", "tab in YAML", "two --config files", "one adam beta", "adam beta above 1",
                   "context too short"]


@pytest.mark.parametrize("case", CATALOGUE_CASES)
def test_bad_input_is_refused_in_one_line_before_anything_starts(case, earlier_run, tiny_model_path, tmp_path, capsys,
                                                                monkeypatch):
    import ray

    ray_starts = []  # any ray.init, whether or not another test left a Ray up in this process
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: ray_starts.append(args) or _refuse_ray())
    cases = _catalogue_cases(earlier_run, tiny_model_path, tmp_path)
    assert sorted(cases) == sorted(CATALOGUE_CASES)  # every case built is run
    args, fragments = cases[case]
    before = _snapshot(earlier_run)
    code = main(args)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, (case, captured.err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("dynalign: error: "), (case, captured.err[-2000:])
    assert "Traceback" not in captured.err + captured.out
    for fragment in fragments:
        assert fragment in lines[0], (case, fragment, lines[0])
    assert _snapshot(earlier_run) == before, f"{case}: the earlier run changed"
    assert ray_starts == [], f"{case}: Ray started before the input was checked"



def test_resume_latest_skips_a_damaged_checkpoint_and_says_so(earlier_run, capsys):
    """The newest checkpoint is damaged (one byte changed): `--resume latest` takes the newest
    intact one and warns, naming the damaged file; a checkpoint with a missing file is damaged too."""
    from dynalign import checkpoint

    assert checkpoint.resolve(earlier_run, "latest") == earlier_run / "checkpoints" / "iter_000000"
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "skipping damaged checkpoint iter_000001" in err and "does not match its checksum" in err
    assert checkpoint.damage(earlier_run / "checkpoints" / "iter_000000") is None


def test_damage_names_a_missing_or_short_file(tmp_path):
    from dynalign import checkpoint

    ckpt = tmp_path / "iter_000003"
    (ckpt / "learner").mkdir(parents=True)
    (ckpt / "learner" / "a.pt").write_bytes(b"x" * 100)
    (ckpt / "state.json").write_text("{}")
    files = {name: checkpoint.file_record(ckpt / name) for name in ("learner/a.pt", "state.json")}
    checkpoint.write_json(ckpt / checkpoint.MANIFEST, {"iteration": 3, "files": files})
    assert checkpoint.damage(ckpt) is None
    (ckpt / "learner" / "a.pt").write_bytes(b"x" * 60)  # cut short, as by a full disk outside our writes
    assert checkpoint.damage(ckpt) == f"{ckpt / 'learner' / 'a.pt'} is 60 bytes, the manifest says 100"
    (ckpt / "learner" / "a.pt").unlink()
    assert checkpoint.damage(ckpt) == f"{ckpt / 'learner' / 'a.pt'} is missing"


def test_few_usable_prompts_warn(tiny_model_path, tmp_path, capsys):
    """8 of 9 prompts over data.max_prompt_tokens leave one for data.prompts_per_iteration = 4: a
    one-line warning with the counts (the run can go on; prompts repeat within an iteration)."""
    path = tmp_path / "prompts.jsonl"
    rows = [{"id": "short", "prompt": "Be kind."}] + [{"id": f"long{i}", "prompt": "word " * 300} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tiny_config(tiny_model_path, tmp_path / "run", f"data.prompts_path={path}", "data.max_prompt_tokens=64")
    stream = _load(config)
    assert len(stream.prompts) == 1 and stream.skipped_too_long == 8
    err = capsys.readouterr().err.strip()
    assert err == (f"dynalign: warning: data.prompts_path = '{path}': 1 usable prompt(s) (8 over data.max_prompt_tokens"
                   " = 64) for data.prompts_per_iteration = 4; prompts repeat within an iteration")
    config.data.prompts_per_iteration = 1
    _load(config)
    assert capsys.readouterr().err == ""


def test_on_long_prompt_doc_names_its_values():
    from dynalign.config import describe

    doc = dict((key, text) for key, _, text in describe())["data.on_long_prompt"]
    assert "(skip)" in doc and "(error)" in doc
