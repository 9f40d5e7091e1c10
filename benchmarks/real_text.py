"""The judge and the prompt generator on real text: SmolLM2-135M-Instruct judging and writing.

    python -m benchmarks.real_text [--model DIR] [--prompts N] [--out FILE]

One rollout engine on the real model (as in the main job, judge.engine=shared) and the same
candidates judged in each mode:
- logprob: the spread of the expected scores (they must not collapse to one value), within-group
  spread, share of groups whose scores all tie;
- generate and group: the parse-failure rate of real judge outputs (retries included), the share
  of candidates left invalid, and examples of outputs the parser refused.
The policy then writes prompts at a few generator temperatures: the share each filter drops and
keeps, with examples of kept prompts. Not a speed benchmark: a quality one; docs/results.md
quotes it. Writes JSON (default benchmarks/results/real_text.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "outputs" / "models" / "smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(MODEL_DIR), help="model directory (default: the fetched SmolLM2)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts judged (G=4 candidates each)")
    parser.add_argument("--temperatures", default="1.0,0.7,0.5", help="generator temperatures tried")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "real_text.json"))
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    import ray

    from dynalign.config import load_config
    from dynalign.data import load_prompts
    from dynalign.driver import absolute_paths
    from dynalign.generators import start_generators
    from dynalign.judge import make_judge
    from dynalign.placement import init_ray
    from dynalign.prompt_gen import PromptGenerator, policy_token_counter
    from dynalign.prompt_store import DROP_REASONS
    from dynalign.rollout import RolloutPool

    run_dir = Path("/tmp/dynalign-real-text")
    config = absolute_paths(load_config(REPO / "configs" / "smollm2_cpu.yaml", [
        f"model.path={args.model}", f"run_dir={run_dir}", "logging.progress=false",
        f"data.prompts_path={REPO / 'configs/eval/value_prompts.jsonl'}", "judge.repeats=1"]))
    init_ray(config)
    result: dict = {"model": args.model, "judge": {}, "generator": {}}
    rollout = RolloutPool(config)
    try:
        prompts = load_prompts(config).take(args.prompts)
        groups = rollout.generate(prompts, iteration=0)
        result["answers"] = {"prompts": len(groups), "group_size": config.rollout.group_size,
                             "mean_tokens": sum(len(c.token_ids) for g in groups for c in g.candidates)
                             / sum(len(g.candidates) for g in groups)}
        for mode in ("logprob", "generate", "group"):
            mode_config = copy.deepcopy(config)
            mode_config.judge.mode = mode
            judged = copy.deepcopy(groups)
            started = time.perf_counter()
            metrics = make_judge(mode_config, rollout).score(judged)
            keys = ("parse_failure_rate", "invalid_rate", "score_mean", "score_std", "within_group_std",
                    "tied_group_share", "length_spearman", "attempts", "parse_failures", "retries")
            result["judge"][mode] = {**{k: metrics.get(k) for k in keys}, "seconds": time.perf_counter() - started,
                                     "score_hist": {k.split(".", 1)[1]: v for k, v in metrics.items()
                                                    if k.startswith("score_hist.")},
                                     "scores": [[round(s, 3) for s in g.rewards] for g in judged[:4]],
                                     "unparsed_examples": [g.judge_info.get("unparsed_example") for g in judged
                                                           if g.judge_info.get("unparsed_example")][:3]}
            print(f"judge {mode}: {json.dumps(result['judge'][mode], default=str)[:400]}", flush=True)
        for temperature in [float(t) for t in args.temperatures.split(",")]:
            gen_config = copy.deepcopy(config)
            gen_config.generation.temperature = temperature
            out_dir = run_dir / f"gen_t{temperature:g}"
            generator = PromptGenerator(gen_config, start_generators(gen_config, rollout), out_dir,
                                        seed_prompts=load_prompts(config).prompts,
                                        count_tokens=policy_token_counter(gen_config))
            rows, stats = [], {}
            for iteration in range(2):
                kept, iteration_stats = generator.generate(iteration)
                rows += kept
                for key, value in iteration_stats.items():
                    stats[key] = stats.get(key, 0) + value
            generator.close()
            candidates = stats["candidates"] or 1
            result["generator"][f"{temperature:g}"] = {
                "requests": stats["requests"], "candidates": stats["candidates"], "kept": stats["kept"],
                "kept_share": stats["kept"] / candidates,
                "dropped_share": {r: stats[f"dropped.{r}"] / candidates for r in DROP_REASONS},
                "examples": [r["prompt"] for r in rows[:8]]}
            print(f"generator T={temperature:g}: {json.dumps(result['generator'][f'{temperature:g}'])[:600]}", flush=True)
    finally:
        rollout.shutdown()
        ray.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
