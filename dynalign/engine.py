"""A vLLM engine inside a Ray actor: what rollout and judge workers share.

The engine holds the current policy weights; ``stage_weights`` + ``apply_staged_weights``
replace them in place between iterations (see ``weight_sync``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from dynalign.config import RolloutConfig, TrainConfig

WORKER_EXTENSION = "dynalign.vllm_ext.WeightSyncExtension"


def engine_env(rollout: RolloutConfig) -> dict[str, str]:
    """Environment for an engine actor's process (vLLM reads these at start)."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(rollout.cpu_kv_cache_gib),
        "TOKENIZERS_PARALLELISM": "false",
    }


class EngineWorker:
    """Base of the rollout and judge actors: one vLLM engine with the policy's weights."""

    def __init__(self, config: TrainConfig, name: str, seed: int, max_model_len: int | None = None):
        from vllm import LLM

        self.name = name
        rollout = config.rollout
        started = time.perf_counter()
        self.llm = LLM(
            model=config.model.path,
            dtype=config.model.dtype,
            max_model_len=max_model_len or rollout.max_model_len,
            tensor_parallel_size=rollout.tensor_parallel_size,
            gpu_memory_utilization=rollout.gpu_memory_utilization,
            enforce_eager=rollout.enforce_eager,
            seed=seed,
            trust_remote_code=config.model.trust_remote_code,
            worker_extension_cls=WORKER_EXTENSION,
            # Log-probs after temperature scaling: what the learner recomputes.
            logprobs_mode="processed_logprobs",
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.start_seconds = time.perf_counter() - started
        self.weight_version = 0

    def info(self) -> dict[str, Any]:
        import ray

        return {"name": self.name, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "start_seconds": self.start_seconds, "weight_version": self.weight_version}

    def chat_token_ids(self, messages: list[dict]) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))

    def generate_from_token_ids(self, prompts: list[list[int]], sampling: dict) -> list:
        """Raw vLLM outputs for prompts given as token ids; ``sampling`` holds SamplingParams fields.

        A ``seed`` is spread per prompt (seed + index): one seed shared by every request would
        give different prompts the same random stream, and so correlated candidates.
        """
        from vllm import SamplingParams

        seed = sampling.get("seed")
        params = [SamplingParams(**{**sampling, "seed": None if seed is None else seed + index})
                  for index in range(len(prompts))]
        return self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)

    def chat(self, conversations: list[list[dict]], sampling: dict) -> list[list[str]]:
        """Answer each conversation; returns the ``n`` texts per conversation."""
        outputs = self.generate_from_token_ids([self.chat_token_ids(c) for c in conversations], sampling)
        return [[choice.text for choice in out.outputs] for out in outputs]

    # -- weights ------------------------------------------------------------------------------
    def stage_weights(self, blob: bytes) -> int:
        return sum(self.llm.collective_rpc("dynalign_stage_weights", args=(blob,)))

    def apply_staged_weights(self, version: int) -> int:
        loaded = self.llm.collective_rpc("dynalign_apply_staged_weights")[0]
        self.weight_version = version
        return loaded

    def weight_checksum(self) -> float:
        return self.llm.collective_rpc("dynalign_weight_checksum")[0]

    def collective_rpc(self, method: str, args: tuple = ()) -> list:
        """Escape hatch for weight-transfer backends that talk to vLLM's workers directly."""
        return self.llm.collective_rpc(method, args=args)
