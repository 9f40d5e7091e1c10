"""Benchmark 3, learner: GRPO step tokens/s through DeepSpeed ranks under Ray Train against plain torch.

    python -m benchmarks.bench_learner [--quick] [--out FILE]

Same batch (synthetic GRPO samples: real chat-templated prompts, random completions, group-
normalised advantages), same model (the tiny Llama of the smoke config, fp32), same optimizer
settings. Four legs per repeat, back to back, order rotated:

- ``LearnerGroup.train_step`` as the driver calls it (DeepSpeed ZeRO-2 under Ray Train, through the
  command channel; timed in the driver), with one rank (one core: the headline figure, against
  one-thread baselines) and with the smoke config's two ranks (scaling, for context);
- plain torch in this process, one thread: forward + backward per micro-batch, clip, one AdamW
  step (the issue's baseline; a policy-gradient surrogate loss);
- ``PolicyTrainer.train_step`` itself run in this process on a plain-torch stand-in for the
  DeepSpeed engine: the identical GRPO computation (length-sorted micro-batches, logits for the
  completion positions only, behaviour log-probs from the training forward, finite-input check,
  clipped loss, TIS, entropy and gap metrics) without DeepSpeed, Ray or a second rank. The ratio
  to it is the framework's own overhead; the ratio of it to the plain step is GRPO's extra work.

Checks: finite loss, no skipped step, importance ratio 1 on the first micro-step, and both
DeepSpeed learners' losses equal the in-process GRPO loss at every step (all start from the same
weights and take the same updates).
"""

from __future__ import annotations

import math
import os
import random
import time

from benchmarks.common import (
    bench_main,
    bench_result,
    chat_prompt_ids,
    check,
    figure,
    init_ray,
    series,
    tiny_batch_config,
)

NAME, TITLE = "learner", "GRPO step through DeepSpeed + Ray Train vs plain torch"
TARGET = (">=", 0.9)


def synthetic_samples(tokenizer, prompts: list[str], group: int, max_new_tokens: int, seed: int = 0):
    from dynalign.batch import Sample

    rng = random.Random(seed)
    vocab = len(tokenizer)
    samples = []
    for text in prompts:
        prompt_ids = chat_prompt_ids(tokenizer, text)
        rewards = [rng.random() for _ in range(group)]
        mean = sum(rewards) / group
        std = (sum((r - mean) ** 2 for r in rewards) / (group - 1)) ** 0.5
        for reward in rewards:
            length = rng.randint(max_new_tokens // 2, max_new_tokens)
            samples.append(Sample(prompt_token_ids=prompt_ids,
                                  completion_token_ids=[rng.randrange(3, vocab) for _ in range(length)],
                                  engine_logprobs=[-math.log(vocab) + rng.uniform(-0.5, 0.5) for _ in range(length)],
                                  advantage=(reward - mean) / (std + 1e-6)))
    return samples


class PlainEngine:
    """The slice of DeepSpeed's engine ``PolicyTrainer.train_step`` uses, in plain torch:
    accumulate micro-batch gradients, then clip and step AdamW at the accumulation boundary."""

    def __init__(self, model, config, grad_accum_steps: int):
        import torch

        learner = config.learner
        self.module = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=learner.lr, betas=tuple(learner.adam_betas),
                                           weight_decay=learner.weight_decay)
        self.clip, self.gas, self.micro, self.grad_norm = learner.grad_clip, grad_accum_steps, 0, None

    def __call__(self, *args, **kwargs):  # the step's training forward goes through the engine, as DeepSpeed's
        return self.module(*args, **kwargs)

    def zero_optimization_stage(self) -> int:
        return 0

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro + 1) % self.gas == 0  # asked before the micro-step's step()

    def backward(self, loss, scale_wrt_gas: bool = True):
        (loss / self.gas if scale_wrt_gas else loss).backward()

    def step(self):
        import torch

        self.micro += 1
        if self.micro % self.gas == 0:
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(),
                                                                  self.clip if self.clip > 0 else float("inf")))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self):
        return self.grad_norm


def plain_trainer(config, tokenizer, model_path: str):
    """A ``PolicyTrainer`` (rank 0 of 1) whose engine is ``PlainEngine``: the same GRPO code."""
    import torch
    from transformers import AutoModelForCausalLM

    from dynalign.learner import PolicyTrainer, accepts_logits_to_keep

    trainer = object.__new__(PolicyTrainer)
    trainer.config, trainer.rank, trainer.world_size, trainer.zero_stage = config, 0, 1, 0
    trainer.tokenizer, trainer.reference = tokenizer, None
    samples = config.data.prompts_per_iteration * config.rollout.group_size // config.learner.updates_per_iteration
    trainer.grad_accum_steps = samples // config.learner.micro_batch_size
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    trainer.engine = PlainEngine(model, config, trainer.grad_accum_steps)
    trainer.keeps_logits = accepts_logits_to_keep(model)
    return trainer


def plain_step(model, optimizer, batches, temperature: float, clip: float, total_tokens: int) -> float:
    """forward + backward per micro-batch (policy-gradient surrogate), clip, one AdamW step: the
    loop one writes by hand (micro-batches in arrival order, logits for every position)."""
    import torch

    from dynalign import grpo

    model.train()
    total = 0.0
    for batch in batches:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logprobs = grpo.token_logprobs(logits[:, batch.scored_from:-1], batch.target_ids, temperature=temperature)
        loss = -(batch.advantages[:, None] * logprobs * batch.completion_mask).sum() / total_tokens
        loss.backward()
        total += float(loss.detach())
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def run(quick: bool = False) -> dict:
    import copy

    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dynalign.batch import pad_samples
    from dynalign.data import load_prompts
    from dynalign.learner import LearnerGroup

    prompts_n, group, new_tokens, repeats = (4, 4, 32, 2) if quick else (8, 8, 64, 5)
    model_path, config = tiny_batch_config("learner", prompts_n, group, new_tokens)
    one_rank = copy.deepcopy(config)
    one_rank.learner.num_ranks, one_rank.learner.num_cpus_per_rank = 1, 1.0
    one_rank.learner.threads_per_rank = 1  # one core against plain torch's one thread
    learner_cfg = config.learner
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = [text for _, text in load_prompts(config).take(prompts_n)]
    samples = synthetic_samples(tokenizer, prompts, group, new_tokens)
    tokens = float(sum(len(s.prompt_token_ids) + len(s.completion_token_ids) for s in samples))
    completion_tokens = sum(len(s.completion_token_ids) for s in samples)
    micro = learner_cfg.micro_batch_size
    batches = [pad_samples(samples[i:i + micro], tokenizer.pad_token_id) for i in range(0, len(samples), micro)]
    # One thread, like each learner rank (Ray gives a rank with < 2 CPUs one OpenMP thread): equal
    # resources against the one-rank learner. Two threads on a machine shared with other work also
    # stall at every OpenMP barrier, which would make a small model's baseline erratic.
    torch.set_num_threads(1)
    details = {"samples": len(samples), "tokens_per_step": tokens, "repeats": repeats,
               "model": "tiny Llama (hidden 128, 2 layers, vocab 320), fp32",
               "learner": f"ZeRO-{learner_cfg.zero_stage}, micro-batch {micro}, 1 torch thread per rank; "
                          f"1 rank (1 CPU) and {learner_cfg.num_ranks} ranks ({learner_cfg.num_cpus_per_rank} CPU each)",
               "baseline_threads": torch.get_num_threads()}

    init_ray(num_cpus=max(2, os.cpu_count() or 2))
    learner1 = LearnerGroup(one_rank, storage_path=os.path.join(config.run_dir, "ray_train_1"))
    learner2 = LearnerGroup(config, storage_path=os.path.join(config.run_dir, "ray_train_2"))
    grpo_plain = plain_trainer(config, tokenizer, model_path)
    plain_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=learner_cfg.lr, betas=tuple(learner_cfg.adam_betas),
                                  weight_decay=learner_cfg.weight_decay)

    def timed(fn):
        started = time.perf_counter()
        out = fn()
        return time.perf_counter() - started, out

    legs = {
        "ds1": lambda: learner1.train_step(samples),
        "ds2": lambda: learner2.train_step(samples),
        "grpo_plain": lambda: grpo_plain.train_step(samples),
        "plain": lambda: plain_step(plain_model, plain_opt, batches, config.rollout.temperature, learner_cfg.grad_clip,
                                    completion_tokens),
    }
    order = list(legs)
    tps = {name: [] for name in order}
    losses = {name: [] for name in order}
    ds_metrics, step_seconds = [], {"ds1": [], "ds2": [], "grpo_plain": []}
    # warm-up (DeepSpeed JIT-builds its shm comm op on first use; first steps allocate optimizer state)
    for r in range(repeats + 1):
        for name in order[r % 4:] + order[:r % 4]:
            seconds, out = timed(legs[name])
            losses[name].append(out if name == "plain" else out["loss"])
            if name != "plain":
                step_seconds[name].append(out["step_seconds"])
            if name.startswith("ds"):
                ds_metrics.append(out)
                assert out["tokens"] == tokens or out["skipped_nonfinite"], "learner counted other tokens"
            if r > 0:
                tps[name].append(tokens / seconds)
    # Fixed cost of one command through the channel (no payload), and of shipping the batch.
    round_trips, puts = [], []
    for _ in range(5):
        round_trips.append(timed(lambda: learner1.call("ping"))[0])
        puts.append(timed(lambda: ray.put(samples))[0])
    details["command_round_trip_s"] = sorted(round_trips)[len(round_trips) // 2]
    details["ray_put_batch_s"] = sorted(puts)[len(puts) // 2]
    # PolicyTrainer's own timing of its update loop (forward + backward + step per micro-batch,
    # after the behaviour log-prob pass): DeepSpeed's share, without Ray and that pass.
    details["update_loop_s"] = step_seconds
    details["step_wall_s"] = {name: [tokens / v for v in values] for name, values in tps.items()}
    learner1.shutdown()
    learner2.shutdown()
    ray.shutdown()

    reference = losses["grpo_plain"]
    loss_gap = max(abs(a - b) for name in ("ds1", "ds2") for a, b in zip(losses[name], reference))
    scale = max(1e-3, max(abs(x) for x in reference))
    checks = [
        check("finite loss, no skipped step", all(math.isfinite(m["loss"]) and m["skipped_nonfinite"] == 0
                                                  for m in ds_metrics) and all(map(math.isfinite, losses["plain"])),
              f"losses {[f'{x:.4g}' for x in losses['ds2']]}"),
        check("importance ratio 1 on the first micro-step", all(m["first_microstep_ratio_max_dev"] < 1e-6
                                                                for m in ds_metrics),
              f"max dev {max(m['first_microstep_ratio_max_dev'] for m in ds_metrics):.2e}"),
        check("tokens counted by the learner == tokens in the batch", all(m["tokens"] == tokens for m in ds_metrics),
              f"{ds_metrics[-1]['tokens']:.0f} vs {tokens:.0f}"),
        check("1-rank and 2-rank DeepSpeed losses == in-process GRPO loss at every step",
              loss_gap <= 1e-4 * scale + 1e-6, f"max |diff| {loss_gap:.2e} over {len(reference)} steps "
                                               f"(loss scale {scale:.3g})"),
    ]
    details["losses"] = losses
    details["ray_worker_niceness"] = os.environ.get("RAY_worker_niceness")
    ds1 = series("LearnerGroup.train_step, 1 rank", "tokens/s", tps["ds1"])
    plain = series("plain fwd+bwd+AdamW, in-process, 1 thread", "tokens/s", tps["plain"])
    gp = series("PolicyTrainer.train_step on plain torch", "tokens/s", tps["grpo_plain"])
    figures = [
        figure("ds_over_plain", "LearnerGroup (1 rank) / plain torch step", ds1, plain, TARGET,
               note="same batch, model, one core each; the GRPO step sorts micro-batches by length and skips prompt logits, the plain loop does neither"),
        figure("ds_over_grpo_plain", "LearnerGroup (1 rank) / same GRPO step in-proc.", ds1, gp,
               note="framework overhead only: DeepSpeed + Ray Train + command channel"),
        figure("grpo_plain_over_plain", "GRPO step / plain step, both in-process", gp, plain,
               note="GRPO's extra work (IS weights, clipping, entropy and gap metrics) less what length sorting and prompt-logit skipping save"),
        figure("ds2_over_plain", f"LearnerGroup ({learner_cfg.num_ranks} ranks, smoke) / plain step",
               series(f"LearnerGroup.train_step, {learner_cfg.num_ranks} ranks", "tokens/s", tps["ds2"]), plain,
               note=f"{learner_cfg.num_ranks} cores against one; ideal {learner_cfg.num_ranks} x the 1-rank figure"),
    ]
    return bench_result(NAME, TITLE, figures, checks, details)


if __name__ == "__main__":
    bench_main(NAME, TITLE, run)
