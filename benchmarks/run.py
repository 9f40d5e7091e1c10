"""The benchmark suite: every figure a ratio against a baseline measured in the same run.

    python -m benchmarks.run [--only NAME[,NAME...]] [--quick] [--results-dir DIR]
    make bench

Each benchmark runs in its own process (``python -m benchmarks.<module> --out FILE``): its Ray
cluster, vLLM engines and memory are gone before the next starts, and a crash or a time-out is
reported as that benchmark's error while the others still run. Their output goes to
``outputs/bench/logs/<name>.log``. At the end the table is printed and the results are written to
``benchmarks/results/<date>-<machine>.json`` (``-quick`` appended for ``--quick``; ``--only``
merges into that day's file). The suite keeps to ``--budget-s`` (19 minutes): a benchmark still
running then is stopped, one not started is reported as not run. Exit status: 0 if every benchmark
ran and passed its checks (a figure below its target is reported, not an error), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    CACHE_DIR,
    REPO,
    RESULTS_DIR,
    bench_result,
    document,
    format_table,
    machine_info,
    now_iso,
    write_results,
)

# name -> (module, title, time limit in seconds for the full run, for --quick). Typical full-run
# times on the 2-core machine: 85 / 200 / 60 / 100 / 105 s (up to ~1.5x that under load).
BENCHMARKS = {
    "rollout": ("benchmarks.bench_rollout", "Rollout pool vs in-process vLLM vs transformers", 360, 300),
    "weight_sync": ("benchmarks.bench_sync", "Weight sync of a 0.5B model vs in-process reload", 540, 480),
    "learner": ("benchmarks.bench_learner", "GRPO step via DeepSpeed/Ray Train vs plain torch", 300, 240),
    "novelty": ("benchmarks.bench_novelty_suite", "Novelty filter vs naive rouge_score", 360, 180),
    "iteration": ("benchmarks.bench_iteration", "End-to-end iteration split and memory per role", 360, 360),
}
SUITE_BUDGET_S = 19 * 60  # `make bench` must end within 20 minutes on the 2-core machine


def run_one(name: str, quick: bool, log_dir: Path, budget_s: float | None = None) -> dict:
    module, title, limit, quick_limit = BENCHMARKS[name]
    limit = quick_limit if quick else limit
    if budget_s is not None:
        if budget_s < 30:
            return bench_result(name, title, error="not run: the suite's time budget is spent")
        limit = min(limit, int(budget_s))
    log_path = log_dir / f"{name}{'-quick' if quick else ''}.log"
    load_before, started_at = os.getloadavg()[0], now_iso()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, log_path.open("w") as log:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, "--out", str(out)] + (["--quick"] if quick else [])
        # A session of its own: on a time-out the whole tree (Ray, vLLM engines) goes.
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
            error = None if rc == 0 else f"exited with status {rc}"
        except subprocess.TimeoutExpired:
            kill_group(proc)
            rc, error = None, f"timed out after {limit} s"
        except KeyboardInterrupt:
            kill_group(proc)
            raise
        wall = time.perf_counter() - started
        if out.is_file():
            result = json.loads(out.read_text())
            if error and not result.get("error"):
                result["error"] = error
                result["ok"] = False
        else:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path.is_file() else ""
            result = bench_result(name, title, error=f"{error or 'no result written'}; log {log_path}:\n{tail}")
    result["wall_s"] = wall
    result["started"] = started_at
    result["load_avg"] = [load_before, os.getloadavg()[0]]  # 1-minute load average before and after
    result["log"] = str(log_path.relative_to(REPO)) if log_path.is_relative_to(REPO) else str(log_path)
    return result


def kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes and fewer repeats (development)")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the JSON goes")
    parser.add_argument("--budget-s", type=float, default=SUITE_BUDGET_S,
                        help="stop starting benchmarks, and cut the running one, once the suite has run this long "
                             "(seconds; 0 for no budget)")
    args = parser.parse_args(argv)
    names = list(BENCHMARKS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    log_dir = CACHE_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    started, t0 = now_iso(), time.perf_counter()
    print(f"dynalign benchmarks on {machine['slug']} (load average {machine['load_avg_start'][0]:.1f}); "
          f"logs in {log_dir}", flush=True)
    results = []
    for name in names:
        print(f"  {name} ...", end="", flush=True)
        left = args.budget_s - (time.perf_counter() - t0) if args.budget_s else None
        result = run_one(name, args.quick, log_dir, left)
        results.append(result)
        status = "ok" if result["ok"] else ("error" if result["error"] else "check failed")
        print(f" {status} ({result['wall_s']:.0f} s)", flush=True)
    doc = document(results, machine, args.quick, started, now_iso())
    path = write_results(doc, Path(args.results_dir), merge=bool(args.only))
    print()
    print(format_table(doc))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; results: {path}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
