"""dynalign.files (atomic writes, JSON lines), dynalign.log, `python -m dynalign` and the declared
dependencies: fast, no Ray."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dynalign.files import (
    JsonlError,
    append_jsonl,
    atomic_directory,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    read_jsonl,
    write_jsonl,
)
from dynalign.log import setup_logging
from dynalign.metrics import read_metrics
from tests.conftest import REPO


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- atomic writes -----------------------------------------------------------------------------

def test_atomic_writes_replace_whole_files(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert _names(tmp_path) == ["a.txt", "b.bin"]  # no temp file left


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_writer_that_raises_midway_leaves_the_old_file_and_no_temp(tmp_path, error):
    target = tmp_path / "config.yaml"
    target.write_text("old")
    with pytest.raises(type(error)):
        with atomic_path(target) as temp:
            temp.write_text("half of the new")
            raise error
    assert target.read_text() == "old" and _names(tmp_path) == ["config.yaml"]

    class Unserialisable:
        pass

    with pytest.raises(TypeError):  # the text is never made: nothing is touched
        atomic_write_text(target, json.dumps({"x": Unserialisable()}))
    assert target.read_text() == "old" and _names(tmp_path) == ["config.yaml"]


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as staging:
        (staging / "weights").write_bytes(b"v1")
    assert (target / "weights").read_bytes() == b"v1"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "weights").write_bytes(b"v2 cut")
            raise RuntimeError("the writer died")
    assert (target / "weights").read_bytes() == b"v1" and _names(tmp_path) == ["model"]
    with atomic_directory(target) as staging:
        (staging / "other").write_text("v3")
    assert _names(target) == ["other"] and _names(tmp_path) == ["model"]  # the old one is gone whole


def test_replacing_a_directory_never_leaves_a_moment_without_it(tmp_path, monkeypatch):
    """The swap is one renameat2(RENAME_EXCHANGE): a reader (vLLM loading run_dir/policy while the
    run saves it again) finds the old directory or the new one, never none. Every rename the swap
    makes is checked; the earlier two-rename swap failed this."""
    import os

    target = tmp_path / "policy"
    with atomic_directory(target) as staging:
        (staging / "weights").write_bytes(b"v1")
    real_replace, seen_missing = os.replace, []

    def replace_and_look(src, dst):
        real_replace(src, dst)
        seen_missing.append(not target.is_dir())

    monkeypatch.setattr(os, "replace", replace_and_look)
    with atomic_directory(target) as staging:
        (staging / "weights").write_bytes(b"v2")
    assert (target / "weights").read_bytes() == b"v2" and _names(tmp_path) == ["policy"]
    assert not any(seen_missing)


# --- JSON lines --------------------------------------------------------------------------------

def test_append_and_read_jsonl(tmp_path):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, {"iteration": 0, "x": float("nan")})
    append_jsonl(path, {"iteration": 1}, {"iteration": 2})
    assert path.read_text().count("\n") == 3
    records = read_jsonl(path)
    assert [r["iteration"] for r in records] == [0, 1, 2] and records[0]["x"] != records[0]["x"]  # NaN survives
    write_jsonl(path, records[:1])
    assert [r["iteration"] for r in read_jsonl(path)] == [0]
    assert read_jsonl(tmp_path / "missing.jsonl", missing_ok=True) == []
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "missing.jsonl")


def test_read_jsonl_skips_a_cut_last_line_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"iteration": 0}) + "\n\n" + json.dumps({"iteration": 1}) + "\n" + '{"iteration": 2, "re')
    with caplog.at_level(logging.WARNING, logger="dynalign.files"):
        assert read_jsonl(path) == [{"iteration": 0}, {"iteration": 1}]
    assert [r.getMessage() for r in caplog.records] == [f"{path}: line 4 was cut short (a crash while it was written); "
                                                        "skipped"]
    with pytest.raises(JsonlError, match="line 4 is not valid JSON"):  # an input file: no excuse
        read_jsonl(path, cut_last_line_ok=False)


def test_read_jsonl_names_a_bad_line_in_the_middle(tmp_path):
    path = tmp_path / "prompt_ids.jsonl"
    path.write_text('{"iteration": 0}\n{"iteration": 1, oops}\n{"iteration": 2}\n')
    with pytest.raises(JsonlError) as caught:
        read_jsonl(path)
    message = str(caught.value)
    assert message == f"{path}: line 2 is not valid JSON (Expecting property name enclosed in double quotes, column 18)"
    assert "\n" not in message and caught.value.line == 2
    path.write_text('{"iteration": 0}\n{"iteration": 1, "cut\n')  # cut, but a line followed it: damage, not a crash
    with pytest.raises(JsonlError, match="line 2"):
        read_jsonl(path)


def test_read_metrics_after_a_crash_mid_write_returns_every_whole_record(tmp_path):
    """What `train --resume` reads back: a metrics.jsonl whose last line a crash cut short."""
    from dynalign.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path)  # no config: metrics.jsonl only
    for iteration in range(3):
        logger.log(iteration, {"reward_mean": 0.5 + iteration})
    logger.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"iteration": 3, "time": 17')  # the crash
    records = read_metrics(tmp_path)
    assert [r["iteration"] for r in records] == [0, 1, 2]
    assert [r["reward_mean"] for r in records] == [0.5, 1.5, 2.5]


def test_truncate_jsonl_drops_later_iterations_and_a_cut_line(tmp_path):
    pytest.importorskip("ray")
    from dynalign.driver import truncate_jsonl

    path = tmp_path / "samples.jsonl"
    append_jsonl(path, *({"iteration": i, "answer": "a"} for i in range(4)))
    with path.open("a") as f:
        f.write('{"iteration": 4, "ans')
    truncate_jsonl(path, last_iteration=1)
    assert [r["iteration"] for r in read_jsonl(path)] == [0, 1] and path.read_text().endswith("}\n")
    append_jsonl(path, {"iteration": 2})  # appends after a whole line again
    assert [r["iteration"] for r in read_jsonl(path, cut_last_line_ok=False)] == [0, 1, 2]


# --- logging -----------------------------------------------------------------------------------

def test_log_messages_render_as_before(capsys):
    log = logging.getLogger("dynalign.some_module")
    log.warning("iteration %d: something to know", 3)
    log.info("started in %.0f s", 12.3)
    captured = capsys.readouterr()
    assert captured.err == "dynalign: warning: iteration 3: something to know\n"
    assert captured.out == "dynalign: started in 12 s\n"
    try:
        setup_logging("WARNING")
        log.info("not shown")
        log.error("shown")
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err == "dynalign: error: shown\n"
        setup_logging("WARNING", verbose=True)
        log.debug("details")
        assert capsys.readouterr().out == "dynalign: debug: details\n"
        assert len(logging.getLogger("dynalign").handlers) == 1  # set up again, never twice
    finally:
        setup_logging()


def test_logging_level_is_a_typed_option():
    from dynalign.config import ConfigError, load_config

    assert load_config(None, ["logging.level=WARNING"]).logging.level == "WARNING"
    assert load_config(None, []).logging.level == "INFO"
    with pytest.raises(ConfigError, match="logging.level"):
        load_config(None, ["logging.level=LOUD"])


# --- python -m dynalign ------------------------------------------------------------------------

def test_python_dash_m_dynalign_help():
    done = subprocess.run([sys.executable, "-m", "dynalign", "--help"], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "usage:" in done.stdout


# --- declared dependencies ---------------------------------------------------------------------

# Imported only on an optional path: the extra that declares each.
OPTIONAL = {"vllm": ("cpu", "gpu"), "lm_eval": ("eval",), "wandb": ("trackers",), "mlflow": ("trackers",)}


def _distribution(requirement: str) -> str:
    return _normalise(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0))


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _third_party_imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / "dynalign").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "dynalign" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(path.name)
    return found


def test_every_third_party_import_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = {_distribution(r) for r in project["dependencies"]}
    extras = {name: {_distribution(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    installed = importlib.metadata.packages_distributions()
    imports = _third_party_imports()
    assert {"numpy", "ray", "torch", "yaml"} <= set(imports)  # the walk sees the imports
    missing = []
    for module, where in sorted(imports.items()):
        candidates = {_normalise(d) for d in installed.get(module, [module])}
        declared = (set().union(*(extras[e] for e in OPTIONAL[module])) if module in OPTIONAL else required)
        if not candidates & declared:
            missing.append(f"{module} (imported by {', '.join(sorted(where))}; distribution "
                           f"{'/'.join(sorted(candidates))})")
    assert not missing, "undeclared in pyproject.toml: " + "; ".join(missing)
