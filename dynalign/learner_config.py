"""The learner's options (``learner.*``, ``learner.lora.*``), kept apart from ``config.py`` to keep
each module small; ``config`` imports and re-exports them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dynalign.options import ConfigError, opt

# The linear layers vLLM can carry a LoRA adapter on for the decoder models we run (Llama, Qwen,
# Mistral, gpt-oss attention): an adapter on any other module could be trained but not served.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# vLLM sizes its adapter slots by one of these ranks (LoRAConfig.max_lora_rank).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class LoraConfig:
    rank: int = opt(0, "LoRA rank r; 0: full fine-tuning (every weight trains and moves to the engines). Above 0 the learner trains a PEFT LoRA adapter and only the adapter moves.", min=0, max=512)
    alpha: float = opt(16.0, "LoRA alpha: the adapter's update is scaled by alpha / rank.", min=0.0, min_exclusive=True)
    dropout: float = opt(0.0, "Dropout on the adapter's input while training (0 keeps the learner's and the engines' log-probs identical).", min=0.0, max=0.9)
    target_modules: list = opt(list(LORA_TARGETS), "Linear layers (by name) that get an adapter; vLLM serves adapters on " + ", ".join(LORA_TARGETS) + ".")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def engine_max_rank(self) -> int:
        """The rank vLLM reserves adapter slots for: the smallest it accepts that holds ``rank``."""
        return next(r for r in VLLM_LORA_RANKS if r >= self.rank)

    def check(self) -> None:
        targets = self.target_modules
        if not targets or not all(isinstance(t, str) for t in targets):
            raise ConfigError(f"learner.lora.target_modules = {targets!r}: give a non-empty list of layer names, "
                              f"e.g. [q_proj, v_proj]")
        for name in targets:
            if name not in LORA_TARGETS:
                raise ConfigError(f"learner.lora.target_modules = {targets!r}: '{name}' cannot carry an adapter the "
                                  f"engines serve; choose from {', '.join(LORA_TARGETS)}")

@dataclass
class LearnerConfig:
    num_ranks: int = opt(2, "DeepSpeed ranks (Ray Train workers).", min=1)
    zero_stage: int = opt(2, "DeepSpeed ZeRO stage: 0, 1, 2 or 3 (one rank runs 1 and 2 as 0: nothing to partition).", min=0, max=3)
    lr: float = opt(1e-5, "AdamW learning rate.", min=0.0, min_exclusive=True)
    weight_decay: float = opt(0.0, "AdamW weight decay.", min=0.0)
    adam_betas: list = opt([0.9, 0.999], "AdamW betas.")
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this (0 disables).", min=0.0)
    micro_batch_size: int = opt(4, "Sequences per forward/backward on one rank.", min=1)
    sort_by_length: bool = opt(True, "Cut micro-batches from sequences sorted by length (less padding; the gradient is the same).")
    updates_per_iteration: int = opt(1, "Optimizer steps per iteration (the batch is split into this many mini-batches).", min=1)
    eps_low: float = opt(0.2, "Lower clip range of the importance ratio (1 - eps_low).", min=0.0)
    eps_high: float = opt(0.28, "Upper clip range of the importance ratio (1 + eps_high), DAPO's clip-higher.", min=0.0)
    beta: float = opt(0.0, "KL-to-reference coefficient; 0 disables the KL term and the reference model.", min=0.0)
    kl_estimator: Literal["k1", "k2", "k3"] = opt("k3", "Estimator of KL(policy || reference) per token.")
    loss_agg: Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"] = opt("token_mean", "Loss aggregation: GRPO (seq_mean_token_mean), DAPO (token_mean) or Dr. GRPO (seq_mean_token_sum_norm).")
    adv_std_norm: Literal["group", "batch", "none"] = opt("group", "Divide advantages by the group's reward std, the batch std, or nothing (Dr. GRPO).")
    tis_cap: float = opt(2.0, "Cap of the truncated importance weights correcting engine-vs-learner log-prob mismatch.", min=1.0)
    tis: bool = opt(True, "Apply truncated importance sampling for the engine/learner mismatch.")
    drop_tied_groups: bool = opt(True, "Drop groups whose rewards all tie (no signal) and refill with fresh prompts (DAPO dynamic sampling).")
    max_refill_rounds: int = opt(2, "Extra generation rounds to refill dropped groups before training on what is left.", min=0)
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    num_cpus_per_rank: float = opt(0.5, "CPUs Ray reserves per learner rank.", min=0.0)
    threads_per_rank: int = opt(0, "torch CPU threads of a learner rank; 0: the cores of its node shared evenly among the ranks there (one rank on a 2-core node uses both). Shown as learner.threads.", min=0)
    num_gpus_per_rank: float = opt(0.0, "GPUs per learner rank (1 on GPU clusters).", min=0.0)
    host_mmap_threshold_mb: float = opt(-1.0, "glibc's mmap threshold in a rank: host allocations this large get their own mapping, unmapped when freed; 0 keeps glibc's rising threshold; -1 (auto): 1 under ZeRO-3 on CPU (its gathers otherwise leave ~1 GiB of freed heap resident: step peak -25%, step time +18%), else 0.", min=-1.0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = opt("PACK", "How Ray places learner ranks across nodes.")
    resources_per_rank: dict = opt({}, "Extra custom Ray resources per learner rank, e.g. {learner_node: 1}.")
    max_nonfinite_steps: int = opt(3, "Stop after this many steps in a row skipped for a NaN or infinite loss.", min=1)
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_failures: int = opt(3, "Times Ray Train restarts the learner group after a rank dies (from the last checkpoint); -1: always.", min=-1)

    def mmap_threshold_bytes(self, zero_stage: int) -> int:
        """``host_mmap_threshold_mb`` resolved for a rank running ``zero_stage`` (0: glibc's own)."""
        if self.host_mmap_threshold_mb >= 0:
            return int(self.host_mmap_threshold_mb * 2**20)
        return 2**20 if zero_stage == 3 and self.num_gpus_per_rank == 0 else 0

    def check(self) -> None:
        betas = self.adam_betas
        if (len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)
                or not all(0.0 <= b < 1.0 for b in betas)):
            raise ConfigError(f"learner.adam_betas = {betas!r}: give two numbers in [0, 1), e.g. [0.9, 0.999]")
        if self.lora.enabled:
            self.lora.check()
