"""`dynalign data-report RUN_DIR`: what the prompt generator kept and dropped, as PNGs and JSON.

For each iteration and for the whole pool: a histogram of pairwise ROUGE-L among kept prompts
(how diverse they are; the novelty threshold is drawn in), the prompt length distribution, and
in ``summary.json`` counts kept and dropped by reason, per pillar and generator, and the mean and
95th percentile of the pairwise similarity. ``overview.png`` puts the whole run on one figure.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from dynalign.config import ConfigError, writable_dir
from dynalign.files import atomic_write_text
from dynalign.prompt_store import DROP_REASONS, PromptStore
from dynalign.report_page import save_png
from dynalign.rouge import rouge_l_f, rouge_tokens


def pairwise_rouge_l(prompts: list[str], max_pairs: int = 200_000, seed: int = 0) -> list[float]:
    """ROUGE-L F of every pair of prompts, or of ``max_pairs`` distinct pairs drawn at random."""
    tokens = [rouge_tokens(p) for p in prompts]
    n = len(tokens)
    total = n * (n - 1) // 2
    if total <= max_pairs:
        pairs = ((i, j) for i in range(n) for j in range(i + 1, n))
    else:
        rng, chosen = random.Random(seed), set()
        while len(chosen) < max_pairs:
            i, j = rng.sample(range(n), 2)
            chosen.add((min(i, j), max(i, j)))
        pairs = iter(sorted(chosen))
    return [rouge_l_f(tokens[i], tokens[j]) for i, j in pairs]


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(values, q))


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def scope_summary(rows: list[dict], stats: dict, similarities: list[float], pairs_total: int) -> dict:
    words = [r["words"] for r in rows]
    return {
        "kept": len(rows),
        "dropped": {reason: int(stats.get(f"dropped.{reason}", 0)) for reason in DROP_REASONS},
        "candidates": int(stats.get("candidates", 0)),
        "requests": int(stats.get("requests", 0)),
        "requests_failed": int(stats.get("requests_failed", 0)),
        "requests_too_long": int(stats.get("requests_too_long", 0)),
        "per_pillar": dict(sorted(Counter(r["pillar"] for r in rows).items())),
        "per_generator": dict(sorted(Counter(r["generator"] for r in rows).items())),
        "pairwise_rouge_l": {"mean": _mean(similarities), "p95": _percentile(similarities, 95),
                             "max": max(similarities, default=None), "pairs": len(similarities),
                             "pairs_total": pairs_total},
        "best_rouge_l_vs_pool": {"mean": _mean([r["rouge_l_best"] for r in rows]),
                                 "p95": _percentile([r["rouge_l_best"] for r in rows], 95)},
        "words": {"mean": _mean(words), "p95": _percentile(words, 95), "min": min(words, default=None),
                  "max": max(words, default=None)},
    }


def _figure(width: float = 6.0, height: float = 4.0, panels: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels)
    return figure, axes


def _plot_similarity(ax, similarities: list[float], threshold: float | None, title: str) -> None:
    import numpy as np

    ax.hist(similarities, bins=np.linspace(0, 1, 41), color="tab:blue")
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"novelty threshold {threshold:g}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("ROUGE-L F between two kept prompts")
    ax.set_ylabel("pairs")
    ax.set_title(title, fontsize=10)


def _plot_lengths(ax, words: list[int], title: str) -> None:
    import numpy as np

    low, high = min(words, default=0), max(words, default=1)
    step = max(1, int(np.ceil((high - low + 1) / 40)))  # whole words per bin, at most 40 bins
    ax.hist(words, bins=np.arange(low, high + step + 1, step) - 0.5, color="tab:gray")
    ax.set_xlabel("prompt length (words)")
    ax.set_ylabel("prompts")
    ax.set_title(title, fontsize=10)


def _save(figure, path: Path) -> None:
    save_png(figure, path, dpi=110)


def data_report(run_dir: str | Path, out_dir: str | Path | None = None, max_pairs: int = 200_000) -> dict:
    """Write the PNGs and ``summary.json`` for ``run_dir``; returns the summary."""
    run_dir = Path(run_dir)
    store = PromptStore(run_dir / "prompts")
    iterations = store.iterations()
    if not iterations:
        raise ConfigError(f"data-report {run_dir}: no generated prompts under {run_dir / 'prompts'}; "
                          "train with generation.enabled=true first")
    out = writable_dir("data-report --out", out_dir if out_dir is not None else run_dir / "data_report")
    threshold = _threshold(run_dir)
    summary: dict = {"run_dir": str(run_dir), "novelty_threshold": threshold, "iterations": {}, "images": []}
    totals: Counter = Counter()
    all_rows: list[dict] = []
    for iteration in iterations:
        rows, stats = store.load(iteration), store.load_stats(iteration)
        all_rows += rows
        totals.update({k: v for k, v in stats.items() if isinstance(v, (int, float))})
        summary["iterations"][str(iteration)] = _scope(out, f"iteration_{iteration:04d}", f"iteration {iteration}",
                                                       rows, stats, threshold, max_pairs, summary["images"])
    summary["overall"] = _scope(out, "all", "all iterations", all_rows, totals, threshold, max_pairs, summary["images"])
    _overview(out / "overview.png", summary, all_rows, threshold, max_pairs)
    summary["images"].append(str(out / "overview.png"))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _scope(out: Path, tag: str, title: str, rows: list[dict], stats: dict, threshold: float | None,
           max_pairs: int, images: list[str]) -> dict:
    similarities = pairwise_rouge_l([r["prompt"] for r in rows], max_pairs)
    n = len(rows)
    result = scope_summary(rows, stats, similarities, n * (n - 1) // 2)
    figure, ax = _figure()
    _plot_similarity(ax, similarities, threshold, f"Pairwise ROUGE-L, {title} ({n} prompts, {len(similarities)} pairs)")
    _save(figure, out / f"rouge_l_{tag}.png")
    figure, ax = _figure()
    _plot_lengths(ax, [r["words"] for r in rows], f"Prompt length, {title} ({n} prompts)")
    _save(figure, out / f"length_{tag}.png")
    images += [str(out / f"rouge_l_{tag}.png"), str(out / f"length_{tag}.png")]
    return result


def _overview(path: Path, summary: dict, rows: list[dict], threshold: float | None, max_pairs: int) -> None:
    figure, (sim_ax, len_ax, drop_ax) = _figure(15.0, 4.2, panels=3)
    overall = summary["overall"]
    similarities = pairwise_rouge_l([r["prompt"] for r in rows], max_pairs)
    _plot_similarity(sim_ax, similarities, threshold,
                     f"Pairwise ROUGE-L among kept prompts (mean {overall['pairwise_rouge_l']['mean'] or 0:.2f}, "
                     f"p95 {overall['pairwise_rouge_l']['p95'] or 0:.2f})")
    _plot_lengths(len_ax, [r["words"] for r in rows], f"Prompt length ({len(rows)} kept prompts)")
    iterations = list(summary["iterations"])
    bottom = [0] * len(iterations)
    colors = dict(zip(("kept", *DROP_REASONS), ("tab:blue", "tab:purple", "tab:orange", "tab:cyan", "tab:olive",
                                                "tab:brown", "tab:pink", "tab:red")))
    for label in ("kept", *DROP_REASONS):
        heights = [summary["iterations"][i]["kept"] if label == "kept" else summary["iterations"][i]["dropped"][label]
                   for i in iterations]
        if any(heights):
            drop_ax.bar(iterations, heights, bottom=bottom, label=label, color=colors[label])
            bottom = [b + h for b, h in zip(bottom, heights)]
    drop_ax.set_xlabel("iteration")
    drop_ax.set_ylabel("candidates (answers for 'unparseable')")
    drop_ax.set_title("Kept and dropped by reason", fontsize=10)
    if any(bottom):
        drop_ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(figure, path)


def _threshold(run_dir: Path) -> float | None:
    """The novelty threshold the run used (from its config.yaml), if known."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.select(OmegaConf.load(path), "generation.novelty_threshold")
    except Exception:
        return None
    return float(value) if isinstance(value, (int, float)) else None
