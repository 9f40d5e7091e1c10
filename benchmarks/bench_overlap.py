"""Off-policy overlap: iterations per second one step off (``rollout.max_staleness=1``) against
synchronous (``max_staleness=0``), same config, same run.

    python -m benchmarks.bench_overlap [--quick] [--out FILE]

Runs ``dynalign.driver.train`` twice on one local Ray, synchronous first, then one step off,
with the same config: the tiny Llama, the policy judging itself on the shared rollout engine
(logprob mode: the self-rewarding loop as it runs by default), one rollout engine and one
learner rank. The engine's process tree is pinned to core 0 and the learner rank's to core 1
(``sched_setaffinity`` on every thread, re-applied as threads appear), each with one torch
thread, so the two roles do not take each other's core when they overlap; the driver and Ray's
own processes float. The batch (prompts, G, answer length) is chosen so that generating plus
judging takes about as long as a learner step on this machine.

Figure: the synchronous run's wall seconds per iteration over the one-step-off run's (wall =
the time between consecutive metrics records; the first ``WARMUP`` iterations of each run are
skipped: vLLM's first calls and the first, not overlapped, iteration; so is the last, where one
step off has nothing left to produce). Both runs do the same work per iteration, so this is the
throughput ratio. Target >= 1.3. The details hold where each
run's seconds go (median per iteration): prompts + generate + judge, learn, waiting for the
groups produced ahead, sync, and the rest.

Checks: the one-step-off run trained on groups exactly one version old from its second
iteration on (the synchronous on fresh ones), dropped none, and its judge versions equal its
generation versions (the judge rule).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
from pathlib import Path

from benchmarks.common import (
    _title,
    bench_config,
    bench_main,
    bench_result,
    check,
    figure,
    init_ray,
    ray_role,
    series,
    tiny_model_path,
)

NAME, TITLE = "overlap", "One step off (max_staleness=1) vs synchronous: iterations per second"
TARGET = (">=", 1.3)
WARMUP = 2
PHASES = ("rollouts", "prompts", "generate", "judge", "learn", "ahead_wait", "sync")
# A batch where generate + judge ~ learn on the 2-core machine (tiny model, one thread each):
# the KL term to a reference model (beta > 0) adds its forward pass to the learner's share.
BATCH = ("data.prompts_per_iteration=8", "rollout.group_size=8", "rollout.max_new_tokens=32",
         "learner.micro_batch_size=2", "learner.beta=0.04")
ROLES = {"rollout": 0, "learner": 1}  # role (common.ray_role of a process title) -> core


class CorePinner:
    """Pins each role's processes (and their descendants, every thread) to its core, every
    ``interval_s``, so threads started later are pinned too."""

    def __init__(self, cores: dict[str, int], interval_s: float = 0.5):
        self.cores, self.interval_s = cores, interval_s
        self.pinned: dict[str, set[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            for proc in psutil.Process().children(recursive=True):
                name = ray_role(_title(proc))
                if name not in self.cores:
                    continue
                try:
                    family = [proc, *proc.children(recursive=True)]
                except psutil.Error:
                    continue
                for member in family:
                    self._pin(member.pid, self.cores[name], name)
            self._stop.wait(self.interval_s)

    def _pin(self, pid: int, core: int, name: str) -> None:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            return
        for tid in tids:
            try:
                if os.sched_getaffinity(tid) != {core}:
                    os.sched_setaffinity(tid, {core})
            except OSError:  # gone meanwhile
                continue
        self.pinned.setdefault(name, set()).add(pid)


def run_side(max_staleness: int, iterations: int, root: Path) -> list[dict]:
    from dynalign.driver import train
    from dynalign.metrics import read_metrics

    config = bench_config(tiny_model_path(), root / f"staleness-{max_staleness}", f"iterations={iterations}",
                          f"rollout.max_staleness={max_staleness}", "learner.num_ranks=1", "learner.threads_per_rank=1",
                          "learner.num_cpus_per_rank=1", "rollout.threads_per_engine=1", "rollout.num_cpus_per_worker=1",
                          "checkpoint.save_final_policy=false", *BATCH)
    train(config)
    return read_metrics(config.run_dir)


def timed_records(records: list[dict]) -> list[tuple[float, dict]]:
    """(wall seconds, record) of the timed iterations: after the warm-up, and before the last,
    which one step off has no next iteration to produce (the pipeline drains)."""
    walls = [(rec["time"] - prev["time"], rec) for prev, rec in zip(records, records[1:])]
    return walls[WARMUP - 1:-1]


def time_split(records: list[dict]) -> dict[str, float]:
    """Median seconds per iteration: wall, each phase, and the rest (wall minus the driver's
    waits: for steps 1-3, the learner, the groups produced ahead, the sync)."""
    timed = timed_records(records)
    split = {p: statistics.median(rec.get(f"time.{p}", 0.0) for _, rec in timed) for p in PHASES}
    split["wall"] = statistics.median(wall for wall, _ in timed)
    split["other"] = statistics.median(wall - sum(rec.get(f"time.{p}", 0.0) for p in ("rollouts", "learn", "ahead_wait",
                                                                                     "sync")) for wall, rec in timed)
    return split


def run(quick: bool = False) -> dict:
    import ray

    iterations = 6 if quick else 12
    root = Path(tempfile.mkdtemp(prefix="bench-overlap-"))
    init_ray(num_cpus=4)  # logical CPUs: the engine and the rank reserve one each; the cores are pinned
    try:
        with CorePinner(ROLES) as pinner:
            runs = {s: run_side(s, iterations, root) for s in (0, 1)}
    finally:
        ray.shutdown()
    walls = {s: [wall for wall, _ in timed_records(records)] for s, records in runs.items()}
    split = {s: time_split(records) for s, records in runs.items()}
    stale = runs[1]
    figures = [figure("overlap_speedup", "synchronous / one-step-off seconds per iteration (throughput ratio)",
                      series("max_staleness=0 wall per iteration", "s", walls[0]),
                      series("max_staleness=1 wall per iteration", "s", walls[1]), TARGET,
                      note=f"iterations {WARMUP}..{iterations - 2} of each run, paired by iteration")]
    checks = [
        check("one step off: groups exactly one version old from iteration 1, none dropped",
              all(r["staleness.max"] == min(r["iteration"], 1) and r["staleness.dropped"] == 0 for r in stale), ""),
        check("synchronous: fresh groups", all(r["staleness.max"] == 0 for r in runs[0]), ""),
        check("the weights that generated a group judged it",
              all(r["version.judge_mismatch"] == 0 and r["version.judge_min"] == r["version.generation_min"]
                  for rs in runs.values() for r in rs), ""),
        check("both runs pinned the engine and the learner rank to their cores",
              set(pinner.pinned) == set(ROLES),
              ", ".join(sorted(pinner.pinned))),
    ]
    details = {
        "config": "configs/smoke.yaml (policy judge, logprob, shared engine) + learner.num_ranks=1, one thread per role, "
                  + ", ".join(BATCH),
        "iterations": iterations, "warmup": WARMUP,
        "seconds_split_median": {f"max_staleness={s}": v for s, v in split.items()},
        "reward_mean": {f"max_staleness={s}": [r["reward_mean"] for r in rs] for s, rs in runs.items()},
        "is_weight_mean": [r.get("learner.is_weight_mean") for r in stale],
        "engine_gap_max_abs": {f"max_staleness={s}": [r["learner.engine_gap_max_abs"] for r in rs]
                               for s, rs in runs.items()},
    }
    return bench_result(NAME, TITLE, figures, checks, details)


if __name__ == "__main__":
    bench_main(NAME, TITLE, run)
