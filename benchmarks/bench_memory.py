"""Learner memory per rank: ZeRO-0/2/3 with 1, 2 and 4 ranks, beta 0 and > 0, on SmolLM2-135M.

    python -m benchmarks.bench_memory [--quick] [--out FILE]

Each layout starts the real learner (DeepSpeed ranks under Ray Train, as the driver does), then,
on every rank, through ``LearnerGroup.memory`` (the kernel's resident high-water mark, reset
between phases):

- ``base``: resident memory before the model is loaded (Python, torch, Ray, DeepSpeed);
- ``model+optimizer``: resident after one GRPO step minus ``base`` (weights, gradients, Adam state
  and, with beta > 0, the reference model, as the rank keeps them between steps);
- ``step peak``: the step's peak minus ``base`` (adds activations and logits), set against the
  planner's estimate (``dynalign.plan.learner_rank_memory``) for the same layout;
- rank 0's rise during ``export_weights`` (a sync) and ``save_policy``: the peak of the rank's own
  (anonymous) memory during the phase, sampled every 2 ms, minus that memory just before it. The
  sync's blobs go to Ray's object store, whose shared pages are mapped into rank 0 while it
  writes them and counted in its RSS: that is the transfer itself (the whole model, which the
  object store holds until the engines have it), not the rank's memory.

Figures (ratios of quantities measured in this run): ZeRO-3's model+optimizer memory per rank over
ZeRO-0's, for 2 and 4 ranks (close to 1/N: the target is 1.25/N); rank 0's rise during a save and
a sync over one bucket (target: at most about a bucket); the planner's estimate over the measured
step peak (target: within 25%). Four ranks oversubscribe the 2 cores, which is fine for memory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO, bench_main, bench_result, check, figure, init_ray, series

NAME, TITLE = "memory", "Learner memory per rank: ZeRO-0/2/3 x 1/2/4 ranks x beta, SmolLM2-135M"
MODEL = REPO / "outputs" / "models" / "smollm2-135m-instruct"
PROMPTS, GROUP, NEW_TOKENS, BUCKET_MB = 4, 2, 64, 32
GIB = 2**30


def layouts(quick: bool) -> list[tuple[int, int, float]]:
    """(ranks, ZeRO stage, beta). One rank runs ZeRO-1/2 as 0 (nothing to partition), so one rank
    is measured at 0 and 3 only."""
    ranks = (1, 2) if quick else (1, 2, 4)
    betas = (0.0,) if quick else (0.0, 0.1)
    return [(n, stage, beta) for beta in betas for n in ranks
            for stage in ((0, 3) if n == 1 or quick else (0, 2, 3))]


def largest_bucket_bytes(bucket_bytes: int) -> int:
    """The largest fp32 bucket ``PolicyTrainer.weight_buckets`` forms for this model (a bucket closes
    once it reaches ``bucket_bytes``, so one large tensor, the embedding, makes a bucket of its own)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(MODEL))
    largest = size = 0
    for _, param in model.named_parameters():
        size += param.numel() * 4
        largest = max(largest, size)
        size = 0 if size >= bucket_bytes else size
    return largest


def layout_config(base, ranks: int, stage: int, beta: float, run_dir: str):
    import copy

    config = copy.deepcopy(base)
    config.run_dir = run_dir
    config.learner.num_ranks, config.learner.zero_stage, config.learner.beta = ranks, stage, beta
    config.learner.num_cpus_per_rank = 2 / ranks  # the 2 cores shared (4 ranks: 0.5 each)
    return config


def measure(config, samples) -> dict:
    """One layout: every rank's memory after start, after a step, during a sync and a save."""
    from dynalign.learner import LearnerGroup

    learner = LearnerGroup(config, storage_path=os.path.join(config.run_dir, "ray_train"))
    try:
        started = learner.memory(reset=True)
        step = learner.train_step(samples)
        after_step = learner.memory(reset=True)
        exported = learner.export_weights(int(BUCKET_MB * 2**20), "float32")
        after_export = learner.memory(reset=True)
        del exported
        learner.save_policy(Path(config.run_dir) / "policy", "bfloat16")
        after_save = learner.memory()
    finally:
        learner.shutdown()
    ranks = []
    for rank, (s, a, e, v) in enumerate(zip(started, after_step, after_export, after_save)):
        ranks.append({
            "rank": rank,
            "base_gib": s["rss_before_model_gib"],
            "start_peak_gib": s["rss_peak_gib"] - s["rss_before_model_gib"],
            "model_optimizer_gib": a["rss_gib"] - s["rss_before_model_gib"],
            "step_peak_gib": a["rss_peak_gib"] - s["rss_before_model_gib"],
            # the rank's own memory, sampled: the object store's shared pages are the transfer
            "sync_rise_gib": e["anon_peak_gib"] - a["rss_anon_gib"],
            "save_rise_gib": v["anon_peak_gib"] - e["rss_anon_gib"],
        })
    return {"ranks": ranks, "loss": step["loss"], "skipped": step["skipped_nonfinite"]}


def run(quick: bool = False) -> dict:
    import torch  # noqa: F401  (before transformers: the local CPU wheel)
    from transformers import AutoTokenizer

    from benchmarks.bench_learner import synthetic_samples
    from dynalign.config import load_config
    from dynalign.data import load_prompts
    from dynalign.driver import absolute_paths
    from dynalign.plan import learner_rank_memory

    if not (MODEL / "config.json").exists():
        subprocess.run([sys.executable, "-m", "dynalign.cli", "fetch-model", "smollm2-135m-instruct", str(MODEL)],
                       check=True, cwd=REPO)
    work = tempfile.mkdtemp(prefix="bench-memory-")
    base = absolute_paths(load_config(REPO / "configs" / "smollm2_cpu.yaml", [
        f"model.path={MODEL}", f"run_dir={work}", "judge.kind=rule", "logging.progress=false",
        "logging.backends=[]", f"rollout.group_size={GROUP}", f"rollout.max_new_tokens={NEW_TOKENS}",
        f"data.prompts_per_iteration={PROMPTS}", "learner.micro_batch_size=1", f"sync.bucket_mb={BUCKET_MB}",
        f"data.prompts_path={REPO / 'configs/prompts/smoke_prompts.jsonl'}",
        # float32 learners with torch's fused attention, as docs/performance.md section 7 was measured,
        # whatever this CPU's bf16 support (the main job's learner_dtype is auto)
        "model.learner_dtype=float32", "model.attn_implementation=sdpa"]))
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    prompts = [text for _, text in load_prompts(base).take(PROMPTS)]
    samples = synthetic_samples(tokenizer, prompts, GROUP, NEW_TOKENS)
    base.data.max_prompt_tokens = max(len(s.prompt_token_ids) for s in samples)  # the planner's shape = this batch's
    bucket_gib = largest_bucket_bytes(BUCKET_MB * 2**20) / GIB
    init_ray(num_cpus=2)

    rows, checks = [], []
    for ranks, stage, beta in layouts(quick):
        from tqdm import tqdm

        tqdm.write(f"memory: {ranks} rank(s), ZeRO-{stage}, beta {beta}")
        config = layout_config(base, ranks, stage, beta, tempfile.mkdtemp(dir=work))
        result = measure(config, samples)
        estimate = learner_rank_memory(config)
        rank0 = result["ranks"][0]
        rows.append({"ranks": ranks, "zero_stage": stage, "beta": beta, "loss": result["loss"],
                     "per_rank": result["ranks"],
                     "model_optimizer_gib": max(r["model_optimizer_gib"] for r in result["ranks"]),
                     "step_peak_gib": max(r["step_peak_gib"] for r in result["ranks"]),
                     "base_gib": rank0["base_gib"],
                     "sync_rise_gib": rank0["sync_rise_gib"], "save_rise_gib": rank0["save_rise_gib"],
                     "planner_gib": {k: v / GIB for k, v in estimate.items()}})
        tqdm.write("  " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items() if k.endswith("_gib") and k != "planner_gib")
                   + f", planner {rows[-1]['planner_gib']['total']:.3f}")
        checks.append(check(f"step ran: {ranks} ranks ZeRO-{stage} beta {beta}", not result["skipped"],
                            f"loss {result['loss']:.4f}"))

    figures, more_checks = layout_figures(rows, bucket_gib)
    checks += more_checks
    details = {"model": "SmolLM2-135M-Instruct, float32 learner", "samples": len(samples),
               "new_tokens": NEW_TOKENS, "bucket_mb": BUCKET_MB, "largest_bucket_gib": bucket_gib, "layouts": rows}
    return bench_result(NAME, TITLE, figures=figures, checks=checks, details=details)


def layout_figures(rows: list[dict], bucket_gib: float) -> tuple[list[dict], list[dict]]:
    """The figures and the planner check, from the measured layouts."""
    def row(ranks, stage, beta=0.0):
        return next((r for r in rows if (r["ranks"], r["zero_stage"], r["beta"]) == (ranks, stage, beta)), None)

    figures = []
    for ranks in (2, 4):
        for beta in (0.0, 0.1):
            if row(ranks, 3, beta) and row(1, 3, beta):  # partitioning alone: ZeRO-3 on N ranks against 1
                figures.append(figure(
                    f"zero3_{ranks}_over_1_rank_beta{beta}",
                    f"ZeRO-3 model+optimizer per rank, {ranks} ranks / 1 rank, beta {beta}",
                    series(f"{ranks} ranks", "GiB", [row(ranks, 3, beta)["model_optimizer_gib"]]),
                    series("1 rank", "GiB", [row(1, 3, beta)["model_optimizer_gib"]]),
                    target=("<=", round(1.25 / ranks, 3)), note=f"1/N = {1 / ranks:.3f}"))
        if row(ranks, 3) and row(ranks, 0):
            figures.append(figure(
                f"zero3_over_zero0_{ranks}_ranks", f"ZeRO-3 / ZeRO-0 model+optimizer per rank, {ranks} ranks",
                series(f"ZeRO-3, {ranks} ranks", "GiB", [row(ranks, 3)["model_optimizer_gib"]]),
                series(f"ZeRO-0, {ranks} ranks", "GiB", [row(ranks, 0)["model_optimizer_gib"]]),
                note="context: between steps ZeRO-0 keeps 12P bytes (its gradients are freed), ZeRO-3 20P/N"))
    whole_fp32 = max(r["planner_gib"]["weights"] * (r["ranks"] if r["zero_stage"] == 3 else 1) for r in rows)
    for phase in ("save", "sync"):
        for stages, label in (((0, 2), "ZeRO-0/2"), ((3,), "ZeRO-3")):
            rises = [r[f"{phase}_rise_gib"] for r in rows if r["zero_stage"] in stages]
            if rises:
                figures.append(figure(
                    f"{phase}_rise_over_bucket_zero{''.join(map(str, stages))}",
                    f"rank 0's own rise during {'save_policy' if phase == 'save' else 'export_weights'}, {label} / one bucket",
                    series(f"{phase} rise, {label} layouts", "GiB", rises),
                    series("largest bucket (fp32)", "GiB", [bucket_gib]), target=("<=", 1.0),
                    note=f"the whole model in fp32: {whole_fp32:.2f} GiB"))
    figures.append(figure("planner_over_measured", "planner's per-rank estimate / measured step peak, every layout",
                          series("planner", "GiB", [r["planner_gib"]["total"] for r in rows]),
                          series("measured step peak", "GiB", [r["step_peak_gib"] for r in rows])))
    off = [(r["ranks"], r["zero_stage"], r["beta"], round(r["planner_gib"]["total"] / r["step_peak_gib"], 3))
           for r in rows if abs(r["planner_gib"]["total"] / r["step_peak_gib"] - 1) > 0.25]
    return figures, [check("planner within 25% of every measured step peak", not off, f"outside: {off}")]


def table(result: dict) -> str:
    """The layouts as a Markdown table (docs/performance.md)."""
    lines = ["| ranks | ZeRO | beta | base | model+optimizer | step peak | planner | sync rise (rank 0) | save rise (rank 0) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["details"]["layouts"]:
        lines.append(f"| {r['ranks']} | {r['zero_stage']} | {r['beta']} | {r['base_gib']:.2f} | "
                     f"{r['model_optimizer_gib']:.2f} | {r['step_peak_gib']:.2f} | {r['planner_gib']['total']:.2f} | "
                     f"{r['sync_rise_gib']:.3f} | {r['save_rise_gib']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    outcome = bench_main(NAME, TITLE, run)
    if outcome.get("details", {}).get("layouts"):
        print(table(outcome), file=sys.stderr)
