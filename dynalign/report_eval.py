"""The evaluations section of ``dynalign report``: the results ``dynalign eval`` wrote to
``RUN_DIR/eval/*.json`` (value alignment: win/tie/loss with intervals, rubric scores, before/after
answer pairs; lm-evaluation-harness tables; anything else as JSON)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from dynalign.files import read_jsonl
from dynalign.report_page import Page


def evaluations(page: Page, run_dir: Path) -> None:
    eval_dir = run_dir / "eval"
    # Value alignment first, then general abilities, then anything else.
    files = sorted(eval_dir.glob("*.json"), key=lambda p: (not p.name.startswith("value_alignment"),
                                                           not p.name.startswith("harness"), p.name)) \
        if eval_dir.is_dir() else []
    loaded = []
    for path in files:
        try:
            loaded.append((path, json.loads(path.read_text())))
        except json.JSONDecodeError:
            continue
    if not loaded:
        return
    page.section("Evaluations")
    for index, (path, result) in enumerate(loaded):
        if isinstance(result, dict) and "overall" in result and "per_pillar" in result:
            _value_alignment(page, path, result, index)
        elif isinstance(result, dict) and "results" in result and "lm_eval_version" in result:
            _harness_table(page, path, result)
        else:
            page.raw(f"<details><summary>{html.escape(path.name)}</summary><pre>"
                     f"{html.escape(json.dumps(result, indent=2)[:20000])}</pre></details>")


def _ci(cell: dict | None, percent: bool = True, digits: int = 3) -> str:
    if not cell or cell.get("rate", cell.get("mean")) is None:
        return "-"
    value = cell.get("rate", cell.get("mean"))
    if percent:
        return f"{100 * value:.1f}% [{100 * cell['low']:.1f}, {100 * cell['high']:.1f}]"
    return f"{value:.{digits}f} [{cell['low']:.{digits}f}, {cell['high']:.{digits}f}]"


def _value_alignment(page: Page, path: Path, result: dict, index: int) -> None:
    prompts, settings = result.get("prompts", {}), result.get("settings", {})
    page.raw(f"<h3>Value alignment: {html.escape(str(result.get('value')))} ({html.escape(path.name)})</h3>")
    page.text(f"policy {result.get('policy')} vs baseline {result.get('baseline')}; judge "
              f"{result.get('judge', {}).get('kind')} ({result.get('judge', {}).get('mode')} mode, both orders); "
              f"{prompts.get('evaluated')} held-out prompts ({prompts.get('dropped_not_held_out')} of "
              f"{prompts.get('total')} dropped: ROUGE-L >= {prompts.get('holdout_threshold')} against a training "
              f"prompt); tie band {settings.get('tie_band')}; {100 * settings.get('confidence', 0.95):g}% bootstrap "
              "intervals.")
    scopes = [("overall", result["overall"]), *result["per_pillar"].items()]
    page.table(("scope", "n", "win", "tie", "loss", "win + tie/2", "preference", "rubric policy", "rubric baseline"),
               [(name, t.get("n"), _ci(t.get("win")), _ci(t.get("tie")), _ci(t.get("loss")),
                 _ci(t.get("win_plus_half_tie")), _ci(t.get("preference"), False, 4),
                 _ci(t.get("rubric", {}).get("policy"), False), _ci(t.get("rubric", {}).get("baseline"), False))
                for name, t in scopes])

    def draw(figure, axes):
        rates, rubric = axes
        names = [name for name, _ in scopes]
        width = 0.27
        for offset, (outcome, colour) in enumerate(zip(("win", "tie", "loss"), ("tab:green", "tab:gray", "tab:red"))):
            xs = [i + (offset - 1) * width for i in range(len(scopes))]
            values = [t[outcome]["rate"] or 0.0 for _, t in scopes]
            errors = [[max(0.0, (t[outcome]["rate"] or 0) - (t[outcome]["low"] or 0)) for _, t in scopes],
                      [max(0.0, (t[outcome]["high"] or 0) - (t[outcome]["rate"] or 0)) for _, t in scopes]]
            rates.bar(xs, values, width, yerr=errors, capsize=3, label=outcome, color=colour)
        rates.set_xticks(range(len(scopes)), names, rotation=20, fontsize=8)
        rates.set_ylim(0, 1)
        rates.set_title("Policy vs baseline: win / tie / loss", fontsize=10)
        rates.legend(fontsize=8)
        for offset, who in enumerate(("policy", "baseline")):
            xs = [i + (offset - 0.5) * 0.35 for i in range(len(scopes))]
            cells = [t.get("rubric", {}).get(who, {}) for _, t in scopes]
            values = [c.get("mean") or 0.0 for c in cells]
            errors = [[max(0.0, (c.get("mean") or 0) - (c.get("low") or 0)) for c in cells],
                      [max(0.0, (c.get("high") or 0) - (c.get("mean") or 0)) for c in cells]]
            rubric.bar(xs, values, 0.35, yerr=errors, capsize=3, label=who)
        rubric.set_xticks(range(len(scopes)), names, rotation=20, fontsize=8)
        lo, hi = settings.get("score_min"), settings.get("score_max")
        if lo is not None and hi is not None:
            rubric.set_ylim(lo, hi)
        rubric.set_title("Mean rubric score", fontsize=10)
        rubric.legend(fontsize=8)

    page.figure(f"eval_{index}_{path.stem}.png", draw, "Rates with bootstrap intervals over prompts; rubric "
                                                       "scores of each model's answers alone.", width=11.0, cols=2)
    _answer_pairs(page, path.with_name(f"{path.stem}_samples.jsonl"))


def _answer_pairs(page: Page, samples: Path, count: int = 5) -> None:
    """Before/after: the baseline's and the policy's answers to the first held-out prompts on which
    they differ (a reward-hacking watch: read what the judge rewarded)."""
    rows = [r for r in read_jsonl(samples, missing_ok=True) if isinstance(r, dict)]
    differing = [r for r in rows if r.get("answer_policy") != r.get("answer_baseline")]
    if not differing:
        return
    page.text(f"Answers: {len(rows) - len(differing)} of {len(rows)} held-out answers are identical; the first "
              f"{min(count, len(differing))} that differ (baseline = before, policy = after):")
    page.table(("prompt", "baseline", "policy", "preference for policy"),
               [(r.get("prompt"), r.get("answer_baseline"), r.get("answer_policy"), r.get("preference_policy"))
                for r in differing[:count]])


def _harness_table(page: Page, path: Path, result: dict) -> None:
    page.raw(f"<h3>General abilities: lm-evaluation-harness ({html.escape(path.name)})</h3>")
    labels = list(result.get("models", {}))
    rows = []
    for task in sorted({t for table in result["results"].values() for t in table}):
        for metric in sorted({m for table in result["results"].values() for m in table.get(task, {})}):
            rows.append((task, metric, *[result["results"][label].get(task, {}).get(metric) for label in labels]))
    page.table(("task", "metric", *labels), rows)
    page.text(f"lm-eval {result.get('lm_eval_version')}, model type {result.get('backend')}; models: "
              + ", ".join(f"{k} = {v}" for k, v in result.get("models", {}).items()), "muted")
