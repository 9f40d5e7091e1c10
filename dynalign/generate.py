"""`dynalign generate`: the paper's Phase 1 as a command: a prompt dataset about the value.

    dynalign generate --config configs/smollm2_cpu.yaml --num-prompts 200 [--out DIR] [key=value ...]

Several generator agents (``generation.generators``: the policy, other vLLM models or
OpenAI-compatible endpoints, each optionally writing as a ``persona``) write prompts about the
value in rounds until ``--num-prompts`` have passed the filters (length, duplicates, ROUGE-L
novelty against every prompt kept so far). Every round is stored as it is kept
(``OUT/prompts/iteration_NNNN.parquet``, the layout of a training run), so a stopped or repeated
command continues where it stood. At the end come the dataset ``OUT/prompts.parquet`` and the data
report (``OUT/data_report/``, the paper's Fig. 3: pairwise ROUGE-L and lengths).
``dynalign train data.prompts_path=OUT/prompts.parquet`` then trains on it.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from dynalign.config import ConfigError, TrainConfig, load_config, writable_dir

log = logging.getLogger(__name__)

DATASET = "prompts.parquet"


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="write a prompt dataset about the value with generator agents (novelty-filtered), plus its data report",
        description="Phase 1 of Dynamic Alignment: the generators in generation.generators write prompts about the "
                    "value until N pass the filters; writes OUT/prompts.parquet and OUT/data_report/. A repeated "
                    "call continues from what OUT holds. Options: generation.* (`dynalign config --doc`).",
    )
    p.add_argument("--config", metavar="YAML", default=None, help="YAML file of options (value spec, generators)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override options, e.g. generation.temperature=0.9")
    p.add_argument("--num-prompts", type=int, required=True, metavar="N", help="prompts the dataset should hold")
    p.add_argument("--out", metavar="DIR", default=None, help="output directory (default: RUN_DIR/generated)")
    p.add_argument("--max-rounds", type=int, default=0, metavar="R",
                   help="give up after R rounds of requests (default: 0, four times the rounds N needs at best)")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.num_prompts < 1:
        raise ConfigError(f"generate --num-prompts {args.num_prompts}: must be at least 1")
    if args.max_rounds < 0:
        raise ConfigError(f"generate --max-rounds {args.max_rounds}: must be 0 (automatic) or more")
    out = writable_dir("generate --out", args.out if args.out else Path(config.run_dir) / "generated")
    summary = generate_dataset(config, args.num_prompts, out, max_rounds=args.max_rounds)
    overall = summary["report"]["overall"]
    dropped = ", ".join(f"{k} {v}" for k, v in overall["dropped"].items() if v) or "none"
    print(f"{summary['prompts']} prompts in {summary['path']} after {summary['rounds']} round(s) "
          f"({overall['candidates']} candidates; dropped: {dropped}); pairwise ROUGE-L mean "
          f"{overall['pairwise_rouge_l']['mean'] or 0:.3f}, p95 {overall['pairwise_rouge_l']['p95'] or 0:.3f}")
    print(f"data report: {Path(summary['report']['images'][-1]).parent}")
    print(f"train on it: dynalign train --config ... data.prompts_path={summary['path']} generation.enabled=false")
    return 0


def generate_dataset(config: TrainConfig, num_prompts: int, out: str | Path, max_rounds: int = 0) -> dict:
    """Generate rounds until ``num_prompts`` prompts are kept in ``out``; returns a summary."""
    from dynalign.data import load_prompts
    from dynalign.data_report import data_report
    from dynalign.driver import absolute_paths
    from dynalign.model_fetch import check_model_dir
    from dynalign.prompt_gen import load_spec
    from dynalign.prompt_store import PromptStore

    config = absolute_paths(config)
    load_spec(config.judge.value_spec)  # a bad spec fails before anything starts
    needs_policy = any(g.source == "policy" for g in config.generation.generators)
    if needs_policy:
        check_model_dir(config.model.path, "model.path")
    seeds = load_prompts(config)  # the prompts file seeds the examples (and is checked now)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"generate --out {out}: cannot create it ({err.strerror or err}); give a writable directory") from None
    store = PromptStore(out / "prompts")
    per_round = config.generation.requests_per_iteration * config.generation.prompts_per_request
    max_rounds = max_rounds or 4 * math.ceil(num_prompts / per_round)

    kept, rounds = len(store.load()), 0
    if kept < num_prompts:  # a repeated call on a complete dataset starts no engine
        kept, rounds = _generate_rounds(config, store, out, seeds, kept, num_prompts, max_rounds, needs_policy)
    if kept < num_prompts:
        raise ConfigError(f"generate --num-prompts {num_prompts}: only {kept} prompts passed the filters in "
                          f"{rounds} round(s) (--max-rounds {max_rounds}); raise --max-rounds, or loosen "
                          f"generation.novelty_threshold / min_words / max_words (kept so far: {out / 'prompts'})")
    path = write_dataset(store, out / DATASET, num_prompts)
    report = data_report(out, None)
    return {"prompts": num_prompts, "path": str(path), "rounds": rounds, "report": report}


def _generate_rounds(config: TrainConfig, store, out: Path, seeds, kept: int, num_prompts: int, max_rounds: int,
                     needs_policy: bool) -> tuple[int, int]:
    """Start the generators and run rounds until ``num_prompts`` are kept (or ``max_rounds``);
    returns (prompts kept, rounds run)."""
    from tqdm import tqdm

    from dynalign.generators import start_generators
    from dynalign.prompt_gen import PromptGenerator, policy_token_counter

    ray_started = False
    rollout = None
    generators: list = []
    needs_ray = any(g.source in ("policy", "vllm") for g in config.generation.generators)
    try:
        if needs_ray:
            from dynalign.placement import init_ray

            ray_started = init_ray(config)
        if needs_policy:
            from dynalign.rollout import RolloutPool

            rollout = RolloutPool(config)
        generators = start_generators(config, rollout)
        generator = PromptGenerator(config, generators, out, seed_prompts=seeds.prompts,
                                    count_tokens=policy_token_counter(config) if needs_policy else None)
        generators = []  # the PromptGenerator closes them now
        try:
            first = max(store.iterations(), default=-1) + 1
            rounds = 0
            progress = tqdm(total=num_prompts, initial=min(kept, num_prompts), desc="prompts kept",
                            disable=not config.logging.progress)
            while kept < num_prompts and rounds < max_rounds:
                rows, _stats = generator.generate(first + rounds)
                rounds += 1
                progress.update(min(len(rows), num_prompts - min(kept, num_prompts)))
                kept += len(rows)
            progress.close()
        finally:
            generator.close()
    finally:
        for g in generators:
            g.close()
        if rollout is not None:
            rollout.shutdown()
        if ray_started:
            import ray

            ray.shutdown()
    return kept, rounds


def write_dataset(store, path: Path, count: int) -> Path:
    """The first ``count`` kept prompts, in the order they were kept, as one Parquet file."""
    from dynalign.prompt_store import write_prompt_rows

    write_prompt_rows(path, store.load()[:count])
    return path
