"""LoRA against full fine-tuning on SmolLM2-135M-Instruct: what a sync moves, how long it takes,
and how long a learner step takes.

    python -m benchmarks.bench_lora [--quick] [--out FILE] (not part of `make bench`)

Model: ``outputs/models/smollm2-135m-instruct`` (``dynalign fetch-model smollm2-135m-instruct``),
or the directory in ``DYNALIGN_BENCH_SMOLLM2``.

Both sides are the project's real code in this process: two ``PolicyTrainer`` ranks (a one-rank
gloo group, DeepSpeed as the learner runs it; one full fine-tuning, one with ``learner.lora``
rank 16 on every linear layer of the decoder), one ``RolloutPool`` engine (vLLM, LoRA enabled,
in a local Ray), and ``WeightSync.sync`` as the driver calls it: the full side's rank 0 exports
every weight in the engines' dtype into the object store and the engine reloads in place; the
LoRA side exports the adapter alone and the engine loads it from memory as a new adapter version.
Each repeat runs both sides back to back (paired ratios): one GRPO step on the same 8 samples
(2 prompts x 4 answers of 64 tokens), then one sync.

Checks: after each LoRA sync the engine holds exactly one adapter (the new version); the LoRA
step trains the adapter alone.
"""

from __future__ import annotations

import os
import random
import socket
import tempfile
from pathlib import Path

from benchmarks.common import (
    REPO,
    bench_main,
    bench_result,
    chat_prompt_ids,
    check,
    figure,
    init_ray,
    series,
)

NAME, TITLE = "lora", "LoRA vs full fine-tuning on SmolLM2-135M: sync bytes and seconds, learner step"
RANK = 16


def smollm2_path() -> str:
    path = Path(os.environ.get("DYNALIGN_BENCH_SMOLLM2", REPO / "outputs/models/smollm2-135m-instruct"))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no model; run `dynalign fetch-model smollm2-135m-instruct {path}` "
                                "or set DYNALIGN_BENCH_SMOLLM2")
    return str(path)


def one_rank_group() -> None:
    """A one-rank gloo group, set up the way Ray Train sets up each rank's."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def samples(tokenizer, count: int, length: int) -> list:
    from dynalign.batch import Sample

    rng = random.Random(0)
    prompt = chat_prompt_ids(tokenizer, "Name one thing a community can do together.")
    return [Sample(prompt_token_ids=prompt, completion_token_ids=[rng.randrange(100, 20000) for _ in range(length)],
                   engine_logprobs=[-5.0] * length, advantage=(-1.0) ** i) for i in range(count)]


def run(quick: bool = False) -> dict:
    import ray

    from benchmarks.common import bench_config
    from dynalign.driver import absolute_paths
    from dynalign.learner import PolicyTrainer
    from dynalign.rollout import RolloutPool
    from dynalign.weight_sync import WeightSync

    repeats = 2 if quick else 3
    model = smollm2_path()
    run_dir = tempfile.mkdtemp(prefix="bench-lora-")
    common = ("judge.kind=rule", "learner.num_ranks=1", "learner.micro_batch_size=4", "data.prompts_per_iteration=2",
              "rollout.group_size=4", "rollout.max_new_tokens=64", "rollout.max_model_len=256", "learner.lr=1e-5")
    configs = {"full": absolute_paths(bench_config(model, run_dir, *common)),
               "lora": absolute_paths(bench_config(model, run_dir, *common, f"learner.lora.rank={RANK}",
                                                   f"learner.lora.alpha={2 * RANK}"))}
    one_rank_group()
    init_ray(2)
    pool = RolloutPool(configs["lora"])  # LoRA enabled: the same engine takes full reloads and adapters
    try:
        trainers = {side: PolicyTrainer(config, rank=0, world_size=1) for side, config in configs.items()}
        syncs = {side: WeightSync(config, pool.synced) for side, config in configs.items()}
        batch = samples(trainers["full"].tokenizer, 8, 64)
        step_s = {"full": [], "lora": []}
        sync_s = {"full": [], "lora": []}
        sync_bytes = {"full": [], "lora": []}
        adapters_held = []
        version = 0
        for _ in range(repeats):
            for side in ("full", "lora"):
                step_s[side].append(trainers[side].train_step(batch)["step_seconds"])
                version += 1
                stats = syncs[side].sync(trainers[side], version)
                sync_s[side].append(stats["sync_seconds"])
                sync_bytes[side].append(stats["sync_bytes"])
                if side == "lora":
                    adapters_held.append(ray.get(pool.workers[0].adapter_ids.remote()))
        trainable = {n for n, p in trainers["lora"].engine.module.named_parameters() if p.requires_grad}
        parameters = {side: sum(p.numel() for p in t.engine.module.parameters() if p.requires_grad)
                      for side, t in trainers.items()}
    finally:
        pool.shutdown()
    figures = [
        figure("lora_sync_bytes_ratio", f"bytes a sync moves, LoRA rank {RANK} / full",
               series("LoRA adapter sync", "B", sync_bytes["lora"]), series("full sync", "B", sync_bytes["full"])),
        figure("lora_sync_seconds_ratio", f"seconds a sync takes, LoRA rank {RANK} / full",
               series("LoRA adapter sync", "s", sync_s["lora"]), series("full sync", "s", sync_s["full"])),
        figure("lora_step_seconds_ratio", f"learner step seconds, LoRA rank {RANK} / full fine-tuning",
               series("LoRA step", "s", step_s["lora"]), series("full fine-tuning step", "s", step_s["full"])),
    ]
    checks = [check("one adapter version held after each LoRA sync",
                    all(len(ids) == 1 for ids in adapters_held), str(adapters_held)),
              check("the LoRA step trains the adapter alone", all(".lora_" in n for n in trainable),
                    f"{parameters['lora']} trainable parameters against {parameters['full']}")]
    return bench_result(NAME, TITLE, figures, checks, details={
        "model": model, "engine_dtype": configs["full"].engine_dtype, "lora_rank": RANK,
        "trainable_parameters": parameters, "samples": "8 x (prompt + 64 tokens)", "repeats": repeats})


if __name__ == "__main__":
    bench_main(NAME, TITLE, run)
