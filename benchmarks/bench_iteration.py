"""Benchmarks 5 and 6, end-to-end iteration: where an iteration's seconds go, and peak memory per role.

    python -m benchmarks.bench_iteration [--quick] [--out FILE]

Runs ``dynalign.driver.train`` on the smoke config (tiny Llama, self-rewarding logprob judge,
2 DeepSpeed ranks) with a dedicated judge engine (``judge.engine=dedicated``: every role of a real
run has its own processes and the sync reaches two engines), for a few iterations, and reads
``metrics.jsonl``. The first iteration is warm-up and is skipped.

Time: an iteration's wall time is the time between two consecutive metrics records (so it also
holds the logging and bookkeeping after the driver's own ``time.total`` stops); "everything else"
is that wall time minus generate, judge, learn and sync: the framework's own overhead (prompt
handling, advantages, Ray calls outside the phases, logging). Target: at most 10%.

Memory: peak RSS of each role's processes, sampled every 0.5 s during the run: the rollout actor
with its vLLM engine-core and worker processes, the judge actor likewise, the learner ranks
(Ray Train workers), the driver, and Ray's own processes; each against the RSS of one bare Python
process with the same stack imported, measured in this run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import (
    RssSampler,
    bench_config,
    bench_main,
    bench_result,
    check,
    figure,
    init_ray,
    series,
    tiny_model_path,
)

NAME, TITLE = "iteration", "End-to-end iteration: time split and framework overhead; peak memory per role"
TARGET_OTHER = ("<=", 0.10)
PHASES = ("generate", "judge", "learn", "sync")
FLOOR_SNIPPET = ("import resource, torch, transformers, vllm, ray, deepspeed; "
                 "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")


def interpreter_floor_mib() -> float:
    """Peak RSS of a bare Python process that imported torch, transformers, vLLM, Ray and DeepSpeed."""
    out = subprocess.run([sys.executable, "-c", FLOOR_SNIPPET], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024  # ru_maxrss is in KiB on Linux


def run(quick: bool = False) -> dict:
    import ray

    from dynalign.driver import train
    from dynalign.metrics import read_metrics

    iterations = 3 if quick else 6
    run_dir = Path(tempfile.mkdtemp(prefix="bench-iteration-"))
    config = bench_config(tiny_model_path(), run_dir / "run", f"iterations={iterations}", "judge.engine=dedicated",
                          "checkpoint.save_final_policy=false")
    floor = interpreter_floor_mib()
    init_ray(num_cpus=max(os.cpu_count() or 2, 3))  # train() finds it; it would start its own otherwise
    driver_pid = os.getpid()
    sampler = RssSampler(interval_s=0.5, extra=lambda: {"driver": [driver_pid]}).__enter__()
    try:
        summary = train(config)
    finally:
        memory = sampler.stop()
        ray.shutdown()
    records = read_metrics(config.run_dir)

    walls, others, phase_values = [], [], {p: [] for p in PHASES}
    driver_other_share = []
    for prev, rec in zip(records, records[1:]):  # iteration 0 is warm-up: no wall time before it anyway
        wall = rec["time"] - prev["time"]
        spent = sum(rec.get(f"time.{p}", 0.0) for p in PHASES)
        walls.append(wall)
        others.append(max(wall - spent, 0.0))
        for p in PHASES:
            phase_values[p].append(rec.get(f"time.{p}", 0.0))
        driver_other_share.append((rec["time.total"] - spent) / rec["time.total"])
    timed = records[1:]
    checks = [
        check("every iteration logged", [r["iteration"] for r in records] == list(range(iterations)),
              f"{len(records)}/{iterations} records"),
        check("finite loss, no skipped step", all(math.isfinite(r["learner.loss"]) and r["learner.skipped_nonfinite"] == 0
                                                  for r in records), ""),
        check("every sync landed (engine log-probs == learner's within 0.05)",
              all(r["learner.engine_gap_max_abs"] < 0.05 for r in records[1:]),
              f"max gap {max(r['learner.engine_gap_max_abs'] for r in records[1:]):.4f} (iterations 1..)"),
        check("every sync moved bytes to both engines", all(r["sync_bytes"] > 0 for r in records), ""),
        check("no invalid judgement", all(r.get("judge.invalid_share", 0.0) == 0.0 for r in records), ""),
    ]
    figures = [figure("other_share", "everything else / iteration wall time",
                      series("wall - (generate+judge+learn+sync)", "s", others),
                      series("iteration wall time", "s", walls), TARGET_OTHER,
                      note="per iteration after the first; wall = time between metrics records")]
    for p in PHASES:
        figures.append(figure(f"{p}_share", f"{p} / iteration wall time", series(f"time.{p}", "s", phase_values[p]),
                              series("iteration wall time", "s", walls)))
    roles = ["rollout", "judge", "learner", "driver", "ray_system"]
    for role in roles:
        if memory.get(role):
            figures.append(figure(f"memory_{role}", f"peak RSS {role} / bare stack process",
                                  series(f"{role} processes (peak, summed)", "MiB", [memory[role]]),
                                  series("python + torch/vllm/ray/deepspeed imported", "MiB", [floor])))
    details = {
        "config": "configs/smoke.yaml + judge.engine=dedicated, " + f"{iterations} iterations (first skipped)",
        "seconds_per_iteration": [r["time.total"] for r in records],
        "driver_time_other_share": driver_other_share,
        "phase_seconds": {p: [r.get(f"time.{p}", 0.0) for r in timed] for p in (*PHASES, "prompts")},
        "peak_rss_mib": memory, "interpreter_floor_mib": floor,
        "processes_per_role": {role: len(pids) for role, pids in sampler.processes.items()},
        "top_processes": sampler.top_processes(),
        "machine_memory_rise_mib": sampler.machine_delta_mib(),
        "ray_worker_niceness": os.environ.get("RAY_worker_niceness"),
        "summary": {k: summary[k] for k in ("iterations", "seconds_per_iteration")},
    }
    (run_dir / "bench.json").write_text(json.dumps(details))
    return bench_result(NAME, TITLE, figures, checks, details)


if __name__ == "__main__":
    bench_main(NAME, TITLE, run)
