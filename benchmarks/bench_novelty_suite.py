"""Benchmark 4, novelty filter: ``NoveltyFilter`` against the naive ``rouge_score`` loop.

    python -m benchmarks.bench_novelty_suite [--quick] [--out FILE]

The benchmark itself is ``benchmarks.bench_novelty.run`` (owned separately; imported, not copied).
The naive reference loop is quadratic: on 5,000 candidates it runs for tens of minutes on this
machine, more than the whole suite may take. So the suite reports two figures:

CPU seconds of this single-threaded process are the primary measure (wall-clock figures are
reported too): on a machine shared with other work, wall time inflates the long naive loop far
more than the short fast runs.

- exact, ``bench_novelty.run(n=1000)``: the naive loop and the fast filter on the same 1,000
  candidates, every decision compared (``run`` raises if any differs);
- 5,000 candidates, naive time estimated: the fast filter runs on all 5,000 (repeats, every run's
  decisions identical); the naive loop runs for ``samples`` candidates spread evenly over the
  stream, each against exactly the pool it met (the prompts kept before it), and the naive time
  is their mean times 5,000. Each sampled naive decision must equal the fast filter's.
"""

from __future__ import annotations

import statistics
import time

from benchmarks.common import bench_main, bench_result, check, figure, series

NAME, TITLE = "novelty", "Novelty filter (ROUGE-L) vs the naive rouge_score loop"
TARGET = (">=", 50.0)


def sampled_naive(candidates: list[str], decisions, samples: int) -> tuple[float, float, list[float], int]:
    """Estimated naive wall and CPU seconds for the whole stream, per-sample wall seconds, and the
    number of sampled decisions that differ from ``decisions``."""
    from dynalign.novelty import naive_filter

    n = len(candidates)
    positions = sorted({min(n - 1, int((i + 0.5) * n / samples)) for i in range(samples)})
    kept_before, pool = [], []
    for decision, text in zip(decisions, candidates):
        kept_before.append(len(pool))
        if decision.kept:
            pool.append(text)
    seconds, cpu, mismatches = [], [], 0
    for j in positions:
        started, cpu_started = time.perf_counter(), time.process_time()
        got = naive_filter([candidates[j]], existing=pool[:kept_before[j]])[0]
        seconds.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
        mismatches += got != decisions[j]
    return statistics.mean(seconds) * n, statistics.mean(cpu) * n, seconds, mismatches


def run(quick: bool = False) -> dict:
    from benchmarks import bench_novelty
    from dynalign.novelty import NoveltyFilter

    exact_n, big_n, samples, repeats = (300, 5000, 8, 2) if quick else (1000, 5000, 40, 3)
    exact = bench_novelty.run(n=exact_n, repeats=repeats, progress=False)

    candidates = bench_novelty.make_candidates(big_n)
    fast_s, fast_cpu, runs = [], [], []
    for _ in range(repeats):
        filt = NoveltyFilter()
        started, cpu_started = time.perf_counter(), time.process_time()
        runs.append(filt.filter(candidates))
        fast_s.append(time.perf_counter() - started)
        fast_cpu.append(time.process_time() - cpu_started)
        filt.close()
    naive_estimate, naive_cpu_estimate, sample_s, mismatches = sampled_naive(candidates, runs[0], samples)

    checks = [
        check(f"identical decisions on all {exact_n} candidates (bench_novelty.run)", exact["decisions_identical"],
              f"{exact['kept']} kept"),
        check(f"fast filter deterministic over {repeats} runs on {big_n}", all(r == runs[0] for r in runs[1:]), ""),
        check(f"{len(sample_s)} sampled naive decisions == fast decisions on {big_n}", mismatches == 0,
              f"{mismatches} differ"),
    ]
    exact_fast = exact_fast_values(exact)
    # CPU seconds of this (single-threaded) process are the primary figures: on a machine shared
    # with other work, wall time stretches the long naive loop far more than the short fast runs.
    figures = [
        figure("speedup_5000_cpu", f"naive / fast CPU s, {big_n} cand. (naive est.)",
               series(f"naive loop, est. from {len(sample_s)} sampled candidates", "CPU s", [naive_cpu_estimate]),
               series("NoveltyFilter.filter", "CPU s", fast_cpu), TARGET,
               note="naive = mean sampled per-candidate time x n (each against its real pool)"),
        figure(f"speedup_{exact_n}_cpu", f"naive / fast CPU s, {exact_n} cand. (exact)",
               series("naive rouge_score loop", "CPU s", [exact["naive_cpu_s"]]),
               series("NoveltyFilter.filter (median)", "CPU s", [exact["fast_cpu_s_median"]]), TARGET,
               note="bench_novelty.run: every decision compared"),
        figure("speedup_5000_wall", f"naive / fast wall s, {big_n} cand. (naive est.)",
               series(f"naive loop, est. from {len(sample_s)} sampled candidates", "s", [naive_estimate]),
               series("NoveltyFilter.filter", "s", fast_s)),
        figure(f"speedup_{exact_n}_wall", f"naive / fast wall s, {exact_n} cand. (exact)",
               series("naive rouge_score loop", "s", [exact["naive_s"]]),
               series("NoveltyFilter.filter", "s", exact_fast)),
    ]
    details = {"exact_run": exact, "big_n": big_n, "kept_of_big_n": sum(d.kept for d in runs[0]),
               "sampled_naive_seconds": sample_s, "naive_estimate_s": naive_estimate,
               "naive_cpu_estimate_s": naive_cpu_estimate, "fast_cpu_s": fast_cpu}
    return bench_result(NAME, TITLE, figures, checks, details)


def exact_fast_values(exact: dict) -> list[float]:
    """``bench_novelty.run`` reports the fast filter's median/min/max; keep those three points
    (the median is the median of the three, as of the original values)."""
    values = [exact["fast_s_min"], exact["fast_s_median"], exact["fast_s_max"]]
    return values if exact.get("fast_s_min") is not None else [exact["fast_s_median"]]


if __name__ == "__main__":
    bench_main(NAME, TITLE, run)
