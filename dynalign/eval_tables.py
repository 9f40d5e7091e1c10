"""`dynalign eval`'s numbers: verdicts from preferences, win/tie/loss rates and mean scores with
percentile bootstrap intervals over prompts (numpy, seeded), overall and per pillar, and the
result files (JSON, markdown table, samples)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from dynalign import files
from dynalign.config import EvalConfig

RESULT_NAME = "value_alignment"
OUTCOMES = ("win", "tie", "loss")


def verdicts(preferences: list[float | None], tie_band: float) -> list[int | None]:
    """+1 win, 0 tie, -1 loss (None: no valid judgement) from the policy's preferences."""
    out = []
    for p in preferences:
        if p is None or not math.isfinite(p):
            out.append(None)
        else:
            out.append(1 if p > 0.5 + tie_band else -1 if p < 0.5 - tie_band else 0)
    return out


def _interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def rate_table(outcomes: list[int], n_boot: int, confidence: float, seed: int) -> dict:
    """Win, tie and loss rates with percentile bootstrap intervals (prompts resampled, seeded).

    The resampled indices depend only on (seed, n): the mirrored outcomes of a swapped comparison
    get the mirrored intervals exactly."""
    values = np.asarray(outcomes, dtype=np.int8)
    n = len(values)
    table: dict[str, Any] = {"n": n}
    if n == 0:
        for name in (*OUTCOMES, "win_plus_half_tie"):
            table[name] = {"rate": None, "low": None, "high": None}
        return table
    index = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    resampled = values[index]
    for name, code in zip(OUTCOMES, (1, 0, -1)):
        low, high = _interval((resampled == code).mean(axis=1), confidence)
        table[name] = {"rate": float((values == code).mean()), "low": low, "high": high}
    low, high = _interval(((resampled == 1) + 0.5 * (resampled == 0)).mean(axis=1), confidence)
    table["win_plus_half_tie"] = {"rate": float(((values == 1) + 0.5 * (values == 0)).mean()), "low": low,
                                  "high": high}
    return table


def mean_table(values: list[float | None], n_boot: int, confidence: float, seed: int) -> dict:
    valid = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(valid) == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    index = np.random.default_rng(seed).integers(0, len(valid), size=(n_boot, len(valid)))
    low, high = _interval(valid[index].mean(axis=1), confidence)
    return {"mean": float(valid.mean()), "low": low, "high": high, "n": int(len(valid))}


def summarize(rows: list[dict], ev: EvalConfig) -> dict:
    """Overall and per-pillar tables from the per-prompt rows (each with 'verdict', 'pillar' and
    the two rubric scores)."""
    def scope(selected: list[dict], offset: int) -> dict:
        seed = ev.seed + offset
        valid = [r for r in selected if r["verdict"] is not None]
        table = rate_table([r["verdict"] for r in valid], ev.bootstrap_samples, ev.confidence, seed)
        table["invalid"] = len(selected) - len(valid)
        # The soft win rate: the judge's mean preference for the policy (0.5 = no difference).
        table["preference"] = mean_table([r["preference_policy"] for r in selected], ev.bootstrap_samples,
                                         ev.confidence, seed)
        table["rubric"] = {who: mean_table([r[f"rubric_{who}"] for r in selected], ev.bootstrap_samples,
                                           ev.confidence, seed) for who in ("policy", "baseline")}
        return table

    pillars = sorted({r["pillar"] for r in rows if r["pillar"] is not None})
    return {"overall": scope(rows, 0),
            "per_pillar": {p: scope([r for r in rows if r["pillar"] == p], 1 + i) for i, p in enumerate(pillars)}}


def write_outputs(out: Path, result: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(out / f"{RESULT_NAME}.json", json.dumps(result, indent=2))
    files.atomic_write_text(out / f"{RESULT_NAME}.md", markdown(result))
    files.write_jsonl(out / f"{RESULT_NAME}_samples.jsonl", rows)


def _pct(cell: dict) -> str:
    if cell.get("rate") is None:
        return "-"
    return f"{100 * cell['rate']:.1f}% [{100 * cell['low']:.1f}, {100 * cell['high']:.1f}]"


def _score(cell: dict, digits: int = 2) -> str:
    if cell.get("mean") is None:
        return "-"
    return f"{cell['mean']:.{digits}f} [{cell['low']:.{digits}f}, {cell['high']:.{digits}f}]"


def markdown(result: dict) -> str:
    """The win/tie/loss table (rates with bootstrap intervals) and the rubric scores."""
    s = result["settings"]
    level = f"{100 * s['confidence']:g}%"
    lines = [f"# Value alignment: {result['value']}", "",
             f"- policy: `{result['policy']}`", f"- baseline: `{result['baseline']}`",
             f"- judge: {result['judge']['kind']} (`{result['judge']['model']}`), {result['judge']['mode']} mode, "
             "both orders", f"- prompts: {result['prompts']['evaluated']} evaluated; "
             f"{result['prompts']['dropped_not_held_out']} of {result['prompts']['total']} dropped as not held out "
             f"(ROUGE-L >= {result['prompts']['holdout_threshold']} against one of "
             f"{result['prompts']['training_prompts']} training prompts)",
             f"- tie band: preference within {s['tie_band']} of 0.5; intervals: {level} bootstrap over prompts "
             f"({s['bootstrap_samples']} resamples, seed {s['seed']})", "",
             f"| scope | n | win [{level} CI] | tie | loss | win + tie/2 | preference | rubric policy | rubric baseline |",
             "|---|---|---|---|---|---|---|---|---|"]
    scopes = [("overall", result["overall"]), *result["per_pillar"].items()]
    for name, t in scopes:
        lines.append(f"| {name} | {t['n']} | {_pct(t['win'])} | {_pct(t['tie'])} | {_pct(t['loss'])} | "
                     f"{_pct(t['win_plus_half_tie'])} | {_score(t['preference'], 4)} | {_score(t['rubric']['policy'])} | "
                     f"{_score(t['rubric']['baseline'])} |")
    position = result["position"]
    if position["first_preference_mean"] is not None:
        lines += ["", f"Position: mean preference for the answer shown first {position['first_preference_mean']:.3f} "
                      f"(0.5 = unbiased); the two orders agree on {100 * (position['order_agreement'] or 0):.0f}% of pairs."]
    return "\n".join(lines) + "\n"
