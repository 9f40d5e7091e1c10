"""One Markdown section per run for docs/results.md, read from the run's own files.

    python -m benchmarks.results_table RUN_DIR [RUN_DIR ...] [--pairs 5]

Per run: the settings that differ between runs, the self-judged reward per iteration, the
held-out value win rate against the base model (the frozen base model judging, both orders, 95%
bootstrap intervals; overall and per pillar), general ability (lm-eval, base vs aligned), and the
reward-hacking watch (answer length drift, share of maximum scores, before/after answer pairs).
Nothing is typed by hand: every number comes from metrics.jsonl, config.yaml and RUN_DIR/eval/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

SETTINGS = ("iterations", "learner.lr", "rollout.group_size", "data.prompts_per_iteration", "rollout.temperature",
            "rollout.max_new_tokens", "learner.beta", "judge.mode", "generation.enabled", "generation.temperature")


def _get(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config.get(part, {}) if isinstance(config, dict) else {}
    return config if config != {} else None


def _pct(cell: dict | None) -> str:
    if not cell or cell.get("rate") is None:
        return "-"
    return f"{100 * cell['rate']:.1f}% [{100 * cell['low']:.1f}, {100 * cell['high']:.1f}]"


def _mean(cell: dict | None, digits: int = 3) -> str:
    if not cell or cell.get("mean") is None:
        return "-"
    return f"{cell['mean']:.{digits}f} [{cell['low']:.{digits}f}, {cell['high']:.{digits}f}]"


def _clip(text: str, limit: int = 220) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def section(run_dir: Path, pairs: int = 5) -> str:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    score_max = _get(config, "judge.score_max")
    lines = [f"### `{run_dir.name}`", "",
             "Settings: " + ", ".join(f"`{k}={_get(config, k)}`" for k in SETTINGS) + ".", ""]
    seconds = sum(m["time.total"] for m in metrics)
    lines += [f"Training: {len(metrics)} iterations in {seconds / 60:.1f} min "
              f"({seconds / max(len(metrics), 1):.0f} s per iteration, engines and learner already up).", "",
              "| iteration | self-judged reward (mean) | judge score std | answer tokens (mean) | truncated | "
              "max-score share | grad norm | engine gap (mean abs) |", "|---|---|---|---|---|---|---|---|"]
    for m in metrics:
        top = m.get(f"judge.score_hist.{score_max}", 0.0) / max(m.get("judge.candidates", 0.0), 1.0)
        lines.append(f"| {m['iteration']} | {m['reward_mean']:.3f} | {m.get('judge.score_std', float('nan')):.3f} | "
                     f"{m['completion_length_mean']:.1f} | {m['truncated_share']:.2f} | {top:.2f} | "
                     f"{m.get('learner.grad_norm', float('nan')):.3f} | {m.get('learner.engine_gap_mean_abs', float('nan')):.4f} |")
    value_path = run_dir / "eval" / "value_alignment.json"
    if value_path.is_file():
        value = json.loads(value_path.read_text())
        judge = value["judge"]
        lines += ["", f"Held-out value alignment, aligned policy vs base model: {value['prompts']['evaluated']} prompts, "
                  f"judge {judge['kind']} `{Path(judge['model']).name}` ({judge['mode']}), both orders; tie = "
                  f"preference within {value['settings']['tie_band']} of 0.5; 95% bootstrap intervals.", "",
                  "| scope | n | win | tie | loss | win + tie/2 | mean preference | rubric aligned | rubric base |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, t in [("overall", value["overall"]), *value["per_pillar"].items()]:
            lines.append(f"| {name} | {t['n']} | {_pct(t['win'])} | {_pct(t['tie'])} | {_pct(t['loss'])} | "
                         f"{_pct(t['win_plus_half_tie'])} | {_mean(t['preference'])} | {_mean(t['rubric']['policy'], 2)} | "
                         f"{_mean(t['rubric']['baseline'], 2)} |")
        position = value["position"]
        tokens = value["answer_tokens_mean"]
        lines += ["", f"Judge position bias: mean preference for the answer shown first "
                      f"{position['first_preference_mean']:.3f} (0.5 = none); the two orders agree on "
                      f"{100 * (position['order_agreement'] or 0):.0f}% of pairs. Answer length (eval, greedy): "
                      f"aligned {tokens['policy']:.1f} tokens, base {tokens['baseline']:.1f}."]
    harness_path = run_dir / "eval" / "harness.json"
    if harness_path.is_file():
        harness = json.loads(harness_path.read_text())
        lines += ["", "General ability (lm-eval):", "", "| task | metric | aligned | base |", "|---|---|---|---|"]
        results = harness.get("results", {})
        policy, base = results.get("policy", {}), results.get("baseline", {})
        for task, task_metrics in sorted(policy.items()):
            for metric, value in sorted(task_metrics.items()):
                if "stderr" in metric:
                    continue
                other = base.get(task, {}).get(metric)
                err = task_metrics.get(f"{metric}_stderr")
                lines.append(f"| {task} | {metric} | {value:.3f}{f' ± {err:.3f}' if err is not None else ''} | "
                             f"{'-' if other is None else f'{other:.3f}'} |")
    samples_path = run_dir / "eval" / "value_alignment_samples.jsonl"
    if samples_path.is_file() and pairs:
        rows = [json.loads(line) for line in samples_path.read_text().splitlines() if line.strip()]
        identical = sum(r["answer_policy"] == r["answer_baseline"] for r in rows)
        lines += ["", f"Before/after (greedy; {identical} of {len(rows)} held-out answers are identical to the base "
                      f"model's), the first {pairs} that differ:", "", "| prompt | base model | aligned |", "|---|---|---|"]
        for row in [r for r in rows if r["answer_policy"] != r["answer_baseline"]][:pairs]:
            lines.append(f"| {_clip(row['prompt'], 90)} | {_clip(row['answer_baseline'])} | {_clip(row['answer_policy'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--pairs", type=int, default=5, help="before/after answer pairs per run")
    args = parser.parse_args()
    print("\n".join(section(run, args.pairs) for run in args.runs))


if __name__ == "__main__":
    main()
