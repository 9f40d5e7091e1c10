"""The learner: DeepSpeed ranks doing GRPO, hosted by Ray Train, driven step by step by the driver.

Ray Train owns the rank processes (placement, the torch.distributed group, restarts on failure)
and runs ``_rank_main`` on each. The driver does not hand control to ``fit()``: a small command
channel actor carries commands (train a batch, export weights, save) to every rank and brings
their results back, so the driver's loop stays in charge of the iteration.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

import ray
import torch

from dynalign import grpo, lora
from dynalign.batch import PaddedBatch, Sample, padding_fraction, rank_micro_batches
from dynalign.buckets import gather_partitioned, to_wire
from dynalign.channel import _RESTARTED, CommandChannel
from dynalign.checkpoint import policy_dtype, write_policy
from dynalign.config import RunError, TrainConfig
from dynalign.files import atomic_write_text
from dynalign.memory import fix_mmap_threshold, memory_gib, release_free_memory, reset_peak
from dynalign.plan import zero_optimization, zero_stage_for

# DeepSpeed compiles its CPU communication op into TORCH_EXTENSIONS_DIR: one per environment (built
# by `make install`), not the shared ~/.cache, where environments rebuild it for each other (~1.5
# min each) and a build killed half-way leaves a lock that every later one waits on forever.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


class LearnerError(RunError):
    """A learner rank failed; the message names the rank and the command."""


class LearnerRestarted(LearnerError):
    """Ray Train restarted the learner group (a rank died); it went back to the last checkpoint
    registered with ``report_checkpoint``, or to the initial weights if there was none."""


POINTER_FILE = "dynalign_checkpoint.json"  # what a learner checkpoint registered with Ray Train holds


def accepts_logits_to_keep(model) -> bool:
    """Whether the model's forward can compute logits for the last positions only (transformers'
    causal LMs can; a remote-code model may not)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _all_ranks_agree(flag: bool) -> bool:
    """True only if ``flag`` is true on every rank."""
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _grad_norm(model) -> float:
    """The 2-norm of the gradients in ``.grad``: at the accumulation boundary, after DeepSpeed's
    all-reduce, every rank holds the whole averaged gradient (ZeRO-0)."""
    return float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))


class _RankFailure:
    def __init__(self, rank: int, command: str, trace: str):
        self.rank, self.command, self.trace = rank, command, trace


# ---------------------------------------------------------------------------------------------
# What runs on each rank
# ---------------------------------------------------------------------------------------------

class PolicyTrainer:
    """One rank's DeepSpeed engine and the GRPO step."""

    lora = None  # learner.lora when it trains an adapter (rank > 0); None: full fine-tuning

    def __init__(self, config: TrainConfig, rank: int, world_size: int):
        import deepspeed
        from transformers import AutoConfig, AutoTokenizer

        self.config, self.rank, self.world_size = config, rank, world_size
        self.restored_from: dict | None = None  # the checkpoint Ray Train restarted this group from
        self.rss_before_model_gib = memory_gib()["rss_gib"]  # the runtime alone: torch, Ray, DeepSpeed
        learner = config.learner
        torch.manual_seed(config.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model.path, trust_remote_code=config.model.trust_remote_code)
        self.policy_dtype = policy_dtype(config.checkpoint.policy_dtype, config.model.path)  # before float32 loading
        samples_per_update = config.data.prompts_per_iteration * config.rollout.group_size // learner.updates_per_iteration
        self.grad_accum_steps = samples_per_update // (world_size * learner.micro_batch_size)
        self.zero_stage = zero_stage_for(learner.zero_stage, world_size)
        fix_mmap_threshold(learner.mmap_threshold_bytes(self.zero_stage))  # before the model's tensors
        ds_config = {
            "train_micro_batch_size_per_gpu": learner.micro_batch_size,
            "gradient_accumulation_steps": self.grad_accum_steps,
            "gradient_clipping": learner.grad_clip,
            "zero_optimization": zero_optimization(self.zero_stage, AutoConfig.from_pretrained(config.model.path).hidden_size),
            "bf16": {"enabled": config.learner_dtype == "bfloat16"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31,
        }
        model = self._load_model(ds_config, torch.float32)
        self.lora = learner.lora if learner.lora.enabled else None  # None: full fine-tuning
        if self.lora is not None:
            model = lora.wrap(model, self.lora, learner.gradient_checkpointing)
        if learner.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        trained = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapter only
        optimizer = torch.optim.AdamW(trained, lr=learner.lr, betas=tuple(learner.adam_betas),
                                      weight_decay=learner.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                               dist_init_required=False)
        self.reference = None
        if learner.beta > 0:
            self.reference = self._load_model(ds_config, getattr(torch, config.learner_dtype)).eval()
            self.reference.requires_grad_(False)
            if self.zero_stage == 3:  # DeepSpeed's hooks gather each partitioned layer for its forward
                reference_engine, *_ = deepspeed.initialize(model=self.reference, config=ds_config,
                                                            dist_init_required=False)
                self.reference = reference_engine.module
        self.keeps_logits = accepts_logits_to_keep(lora.base_model(model))  # PEFT's forward passes it on
        release_free_memory()  # what loading freed (state dicts, fp32 staging) goes back to the host

    def _load_model(self, ds_config: dict, dtype: torch.dtype):
        """The model in ``dtype``; under ZeRO-3 built already partitioned (transformers' DeepSpeed
        integration wraps construction and loading in ``deepspeed.zero.Init`` while an
        ``HfDeepSpeedConfig`` is alive), so no rank ever holds the whole model."""
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        zero3 = HfDeepSpeedConfig(ds_config) if self.zero_stage == 3 else None  # noqa: F841 (read through a weakref)
        return AutoModelForCausalLM.from_pretrained(self.config.model.path, dtype=dtype,
                                                    attn_implementation=self.config.model.attn_implementation,
                                                    trust_remote_code=self.config.model.trust_remote_code)

    # -- log-probs ------------------------------------------------------------------------------
    def _sequence_logprobs(self, model, batch: PaddedBatch, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and, asked, entropies) of the scored positions only: no LM-head work on the prompts."""
        if self.keeps_logits:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           logits_to_keep=batch.logits_to_keep).logits[:, :-1]
        else:  # a model without logits_to_keep: same numbers, computed for every position
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, batch.scored_from:-1]
        temperature = self.config.rollout.temperature
        if with_entropy:
            return grpo.token_logprobs(logits, batch.target_ids, temperature=temperature, with_entropy=True)
        return grpo.token_logprobs(logits, batch.target_ids, temperature=temperature), None

    def _micro_batches(self, samples: list[Sample], by_length: bool) -> list[PaddedBatch]:
        return rank_micro_batches(samples, self.rank, self.world_size, self.config.learner.micro_batch_size,
                                  self.tokenizer.pad_token_id, by_length=by_length)

    @torch.no_grad()
    def logprobs(self, samples: list[Sample]) -> list[list[float]]:
        """Learner log-probs of each sample's completion tokens (this rank's share: samples[rank::world])."""
        self.engine.module.eval()
        out = []
        for batch in self._micro_batches(samples, by_length=False):
            logprobs, _ = self._sequence_logprobs(self.engine.module, batch)
            for row in range(logprobs.shape[0]):
                out.append(logprobs[row][batch.completion_mask[row].bool()].tolist())
        return out

    # -- the GRPO step --------------------------------------------------------------------------
    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        learner = self.config.learner
        updates = learner.updates_per_iteration
        per_update = len(samples) // updates
        mini_batches = [samples[u * per_update:(u + 1) * per_update] for u in range(updates)]
        local_micro = [self._micro_batches(mini, by_length=learner.sort_by_length) for mini in mini_batches]

        # Behaviour ("old") log-probs come from the weights that generated the batch. The first
        # mini-batch trains before any update, so its own forward pass gives them (detached, as
        # TRL and verl do); only later mini-batches need a pass now, before the first update.
        # The reference model's log-probs are computed per micro-batch, as they are needed.
        self.engine.module.eval()
        with torch.no_grad():
            old_logprobs = [None] + [[self._sequence_logprobs(self.engine.module, b)[0] for b in mbs]
                                     for mbs in local_micro[1:]]
        self.engine.module.train()

        # A NaN or infinite input (an advantage, an engine log-prob) would poison the weights:
        # every rank checks its share and all ranks skip the step together.
        finite = all(bool(torch.isfinite(b.advantages).all()) and bool(torch.isfinite(b.engine_logprobs).all())
                     for mbs in local_micro for b in mbs)
        if not _all_ranks_agree(finite):
            return {"skipped_nonfinite": 1.0, "nonfinite_forward": 0.0, "step_seconds": 0.0, "tokens": 0.0}
        finite = all(bool(torch.isfinite(x).all()) for mbs in old_logprobs[1:] for x in mbs)
        if not _all_ranks_agree(finite):  # the weights themselves give NaN: no step can help
            return {"skipped_nonfinite": 0.0, "nonfinite_forward": 1.0, "step_seconds": 0.0, "tokens": 0.0}

        reset_peak()
        normalizers = [grpo.LossNormalizer(mode=learner.loss_agg, num_sequences=len(mini),
                                           num_tokens=sum(len(s.completion_token_ids) for s in mini),
                                           max_len=self.config.rollout.max_new_tokens)
                       for mini in mini_batches]
        metrics: dict[str, list[float]] = defaultdict(list)
        started = time.perf_counter()
        for u, micro_batches in enumerate(local_micro):
            for m, batch in enumerate(micro_batches):
                # Through the engine, not its module: ZeRO-3 counts micro-steps in engine.forward and
                # otherwise keeps only the last micro-batch's gradient instead of accumulating.
                logprobs, entropy = self._sequence_logprobs(self.engine, batch, with_entropy=True)
                old = logprobs.detach() if u == 0 else old_logprobs[u][m]
                mask = batch.completion_mask
                ref = None
                if self.reference is not None:
                    with torch.no_grad():
                        ref = self._sequence_logprobs(self.reference, batch)[0]
                is_weights = (grpo.truncated_is_weights(old, batch.engine_logprobs, learner.tis_cap)
                              if learner.tis else None)
                loss, step_metrics = grpo.policy_loss(
                    logprobs, old, batch.advantages, mask, normalizers[u], eps_low=learner.eps_low,
                    eps_high=learner.eps_high, ref_logprobs=ref, beta=learner.beta,
                    kl_estimator=learner.kl_estimator, is_weights=is_weights)
                # Finite inputs, non-finite loss: the forward pass itself overflowed. Gradients of
                # earlier micro-batches are already accumulated, so the run stops (all ranks
                # together, before any backward of it) rather than step on a partial batch.
                if not _all_ranks_agree(bool(torch.isfinite(loss))):
                    return {"skipped_nonfinite": 0.0, "nonfinite_forward": 1.0, "step_seconds": 0.0, "tokens": 0.0}
                # DeepSpeed averages gradients over ranks; the normalizer already divides by the
                # whole batch, so undo the average and skip its per-GAS scaling.
                self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
                if self.engine.is_gradient_accumulation_boundary() and self.engine.zero_optimization_stage() == 0:
                    metrics["grad_norm"].append(_grad_norm(self.engine.module))  # DeepSpeed keeps it under ZeRO only
                self.engine.step()
                if u == 0 and m == 0:
                    metrics["first_microstep_ratio_max_dev"].append(
                        float(((logprobs.detach() - old).exp() - 1).abs().mul(mask).max()))
                metrics["loss"].append(float(loss.detach()) / updates)
                for key, value in step_metrics.items():
                    metrics[key].append(float(value))
                with torch.no_grad():
                    metrics["entropy"].append(float((entropy * mask).sum() / mask.sum().clamp(min=1)))
                    for key, value in grpo.logprob_gap_stats(old, batch.engine_logprobs, mask).items():
                        metrics[f"engine_gap_{key}"].append(float(value))
            if self.engine.zero_optimization_stage() > 0 and (norm := self.engine.get_global_grad_norm()) is not None:
                metrics["grad_norm"].append(float(norm))
        summary = {key: grpo.reduce_metric(key, values) for key, values in metrics.items()}
        summary["skipped_nonfinite"] = summary["nonfinite_forward"] = 0.0
        # A finite loss can still step to NaN weights (an infinite lr, an overflowing gradient):
        # the ranks check their own shard and stop together rather than save a broken policy. One
        # norm over the shard is NaN or inf iff a weight is (or the weights are ~1e19, as broken):
        # 30 ms for SmolLM2 on CPU against 220 ms for an isfinite pass per tensor.
        finite = math.isfinite(summary.get("grad_norm", 0.0)) and bool(torch.nn.utils.get_total_norm(
            [getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()]).isfinite())
        summary["nonfinite_weights"] = 0.0 if _all_ranks_agree(finite) else 1.0
        summary["step_seconds"] = time.perf_counter() - started
        summary["threads"] = float(torch.get_num_threads())
        summary.update({f"{key}_max": value for key, value in memory_gib().items() if "peak" in key})
        release_free_memory()  # the step's activations and gathers, freed, not kept by the allocator
        batches = [b for mbs in local_micro for b in mbs]
        summary["pad_fraction"] = padding_fraction(batches)
        summary["tokens"] = float(sum(int(b.attention_mask.sum()) for b in batches))
        return summary

    # -- weights out ------------------------------------------------------------------------------
    def _bucket_plan(self, bucket_bytes: int, dtype: torch.dtype, adapter: bool = False) -> list[list[tuple]]:
        """The entries cut into buckets of about ``bucket_bytes`` in ``dtype`` (same on every rank)."""
        plan, bucket, size = [], [], 0
        for entry in lora.entries(self.engine.module, self.lora is not None, adapter):
            bucket.append(entry)
            size += getattr(entry[1], "ds_numel", entry[1].numel()) * dtype.itemsize
            if size >= bucket_bytes:
                plan.append(bucket)
                bucket, size = [], 0
        return plan + [bucket] if bucket else plan

    def weight_buckets(self, bucket_bytes: int, dtype: torch.dtype, device: str | None = None, adapter: bool = False):
        """Yield {name: tensor} buckets of the full weights, in ``dtype`` on ``device`` (default: the
        parameters' own). Only one bucket exists at a time: under ZeRO-3 its gather is released
        when the consumer asks for the next one, so the consumer must be done with it by then.
        Every rank must iterate (ZeRO-3 gathers are collective); only rank 0 gets the tensors."""
        import contextlib

        import deepspeed
        for bucket in self._bucket_plan(bucket_bytes, dtype, adapter):
            if self.zero_stage == 3 and all(merge is None for _, _, merge in bucket):  # cast, then gather
                yield gather_partitioned({name: p for name, p, _ in bucket}, dtype, device, keep=self.rank == 0)
                continue
            params = [p for entry in bucket for p in lora.entry_params(entry)]  # LoRA merges gather whole
            gathered = (deepspeed.zero.GatheredParameters(params, modifier_rank=None) if self.zero_stage == 3
                        else contextlib.nullcontext())
            with gathered:
                yield ({entry[0]: lora.entry_value(entry).to(device or entry[1].device, dtype).contiguous()
                        for entry in bucket} if self.rank == 0 else {})

    def export_weights(self, bucket_bytes: int, dtype_name: str) -> dict | None:
        """Rank 0 puts each bucket in the object store as soon as it is gathered (Ray copies its
        bytes straight into shared memory), so its own memory holds one bucket at a time; the sync
        layer ships them. With LoRA only the adapter goes, with the PEFT config the engines build it from."""
        refs, total = [], 0
        adapter = self.lora is not None
        for bucket in self.weight_buckets(bucket_bytes, getattr(torch, dtype_name), device="cpu", adapter=adapter):
            if self.rank == 0:
                total += sum(t.numel() * t.element_size() for t in bucket.values())
                refs.append(ray.put(to_wire(bucket)))
                del bucket
        if self.rank != 0:
            return None
        return {"buckets": refs, "bytes": total, **({"peft_config": lora.engine_peft_config(self.lora)} if adapter else {})}

    def save_policy(self, path: str, dtype_name: str | None = None) -> str | None:
        """Hugging Face format (loadable by transformers and vLLM) in ``dtype_name`` (default:
        ``checkpoint.policy_dtype``, auto = the model's own dtype). Rank 0 writes one safetensors
        shard per bucket as it is gathered (one bucket in host memory at a time) into a staging
        directory that replaces ``path`` atomically. With LoRA: the adapter merged into the base weights."""
        dtype_name = dtype_name or self.policy_dtype
        dtype = getattr(torch, dtype_name)
        bucket_bytes = int(self.config.sync.bucket_mb * 2**20)
        buckets = self.weight_buckets(bucket_bytes, dtype, device="cpu")
        if self.rank != 0:
            for _ in buckets:
                pass
            return None
        write_policy(lora.base_model(self.engine.module), self.tokenizer, buckets, len(self._bucket_plan(bucket_bytes, dtype)),
                     path, dtype_name)
        return str(Path(path))

    def save_adapter(self, path: str) -> str | None:
        """LoRA: the adapter alone in PEFT format, float32 (the trained values), one gather."""
        buckets = self.weight_buckets(2**62, torch.float32, device="cpu", adapter=True)  # one bucket: it is small
        tensors = {name: t for bucket in buckets for name, t in bucket.items()}
        if self.rank != 0:
            return None
        lora.write_adapter(path, tensors, self.lora, self.config.model.path)
        return str(Path(path))

    def save_checkpoint(self, directory: str) -> None:
        """Model, optimizer and scheduler state through DeepSpeed (every rank writes its shard)."""
        self.engine.save_checkpoint(directory, tag="learner")

    def load_checkpoint(self, directory: str) -> None:
        path, _ = self.engine.load_checkpoint(directory, tag="learner")
        if path is None:
            raise FileNotFoundError(f"no learner checkpoint under {directory}")

    def report_checkpoint(self, path: str, iteration: int) -> None:
        """Register a complete dynalign checkpoint with Ray Train, so that a group Ray Train restarts
        after a rank dies starts from it. Ray Train stores a pointer to it (a small JSON file, the
        pattern its docs give for checkpoints kept elsewhere), not a second copy of the state."""
        with tempfile.TemporaryDirectory() as pointer_dir:
            pointer = None
            if self.rank == 0:
                atomic_write_text(Path(pointer_dir) / POINTER_FILE, json.dumps({"path": path, "iteration": iteration}))
                pointer = ray.train.Checkpoint.from_directory(pointer_dir)
            ray.train.report({"iteration": iteration}, checkpoint=pointer)  # a barrier over all ranks
        # Ray Train's controller registers reports on its next poll (every ~2 s): wait for it, so
        # that a rank dying right after this command still restarts from this checkpoint.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    def restore_registered_checkpoint(self) -> None:
        """In a group Ray Train restarted: load the checkpoint last registered, if any."""
        registered = ray.train.get_checkpoint()
        if registered is None:
            return
        with registered.as_directory() as pointer_dir:
            pointer = json.loads((Path(pointer_dir) / POINTER_FILE).read_text())
        self.load_checkpoint(str(Path(pointer["path"]) / "learner"))
        self.restored_from = pointer

    def memory(self, reset: bool = False) -> dict:
        """This rank's host (and GPU) memory in GiB: now, the peak since the last reset, and before
        the model was loaded; ``reset`` then starts a new peak, sampling the rank's own memory too."""
        report = {**memory_gib(), "rss_before_model_gib": self.rss_before_model_gib, "rank": self.rank}
        if reset:
            reset_peak(sample_anon=True)
        return report

    def ping(self) -> dict:
        """Where this rank runs and what it restarted from (the driver keeps it as ``LearnerGroup.infos``)."""
        return {"rank": self.rank, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "restored_from": self.restored_from}

    # -- NCCL weight sync (dynalign.nccl_sync; the driver calls these on every rank) ----------------
    def nccl_address(self) -> dict | None:
        from dynalign.nccl_sync import nccl_address
        return nccl_address(self)

    def nccl_init(self, info: dict) -> dict | None:
        from dynalign.nccl_sync import nccl_init
        return nccl_init(self, info)

    def nccl_send(self, bucket_bytes: int, dtype_name: str) -> dict | None:
        from dynalign.nccl_sync import nccl_send
        return nccl_send(self, bucket_bytes, dtype_name)


def _group_token() -> str:
    """One random token per rank group, the same on every rank (rank 0 draws it)."""
    import uuid

    import torch.distributed as dist

    token = [uuid.uuid4().hex]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    return token[0]


def rank_threads(configured: int, ranks_on_node: int, cores: int | None = None) -> int:
    """torch threads for one learner rank: ``configured``, or this node's cores (the ones this
    process may run on) shared evenly among the ranks on the node, at least one."""
    if configured > 0:
        return configured
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, cores // max(1, ranks_on_node))


def _rank_main(loop_config: dict) -> None:
    """Ray Train's per-worker function: build the trainer, then serve the driver's commands."""
    import torch.distributed as dist

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    channel = loop_config["channel"]
    # Not OMP_NUM_THREADS: Ray sets it from the rank's CPU reservation (0.5 -> 1 thread), which
    # left one of two cores idle through a one-rank step.
    torch.set_num_threads(rank_threads(loop_config["config"].learner.threads_per_rank, context.get_local_world_size()))
    token = _group_token()
    ray.get(channel.join.remote(rank, token))
    trainer, init_error = None, None
    try:
        trainer = PolicyTrainer(loop_config["config"], rank, world_size)
        trainer.restore_registered_checkpoint()  # only a group Ray Train restarted has one
    except Exception:  # reported on the first command, so the driver sees it
        init_error = traceback.format_exc()
    while True:
        seq, name, args = ray.get(channel.next_command.remote(rank, token))
        if name == "stop":
            ray.get(channel.put_result.remote(seq, rank, token, None))
            return
        try:
            if init_error:
                raise RuntimeError(f"learner start failed:\n{init_error}")
            args = tuple(ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args)
            result = getattr(trainer, name)(*args)
        except dist.DistError:
            raise  # a peer rank died mid-collective: let Ray Train restart the whole group
        except Exception:
            result = _RankFailure(rank, name, traceback.format_exc())
        ray.get(channel.put_result.remote(seq, rank, token, result))


@ray.remote(num_cpus=0)
def _fit(config: TrainConfig, channel, storage_path: str) -> None:
    import uuid

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    learner = config.learner
    resources = {"CPU": learner.num_cpus_per_rank}
    if learner.num_gpus_per_rank:
        resources["GPU"] = learner.num_gpus_per_rank
    resources.update(learner.resources_per_rank)
    trainer = TorchTrainer(
        _rank_main,
        train_loop_config={"config": config, "channel": channel},
        scaling_config=ScalingConfig(
            num_workers=learner.num_ranks,
            use_gpu=learner.num_gpus_per_rank > 0,
            resources_per_worker=resources,
            placement_strategy=learner.placement_strategy,
        ),
        run_config=RunConfig(
            # A new name per start: Ray Train resumes a run whose name it finds in storage, and a
            # fresh or resumed dynalign run must not pick up an earlier run's registered checkpoint.
            name=f"learner-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=learner.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()


class LearnerGroup:
    """Driver-side handle: every method is one command run on all ranks."""

    def __init__(self, config: TrainConfig, storage_path: str | os.PathLike, wait: bool = True):
        """Starts the ranks; with ``wait=False`` returns at once (call ``wait_ready`` before use),
        so the caller can start other roles while the ranks import, join and build DeepSpeed."""
        self.config = config
        self.channel = CommandChannel.remote(config.learner.num_ranks)
        storage = str(storage_path) if "://" in str(storage_path) else str(Path(storage_path).resolve())
        self.fit_ref = _fit.remote(config, self.channel, storage)
        self.nonfinite_streak = 0
        self.infos: list[dict] = []
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until every rank has built its model and answered."""
        self.infos = self.call("ping")

    def call(self, name: str, *args, timeout_s: float | None = None) -> list[Any]:
        seq = ray.get(self.channel.submit.remote(name, args))
        results_ref = self.channel.get_results.remote(seq)
        ready, _ = ray.wait([results_ref, self.fit_ref], num_returns=1, timeout=timeout_s)
        if not ready:
            raise LearnerError(f"learner command '{name}' took longer than {timeout_s} s")
        if ready[0] == self.fit_ref:
            ray.get(self.fit_ref)  # raises Ray Train's error
            raise LearnerError(f"learner exited during '{name}'")
        results = ray.get(results_ref)
        if results == _RESTARTED:
            raise LearnerRestarted(f"Ray Train restarted the learner group (a rank died) during '{name}'")
        for result in results:
            if isinstance(result, _RankFailure):
                raise LearnerError(f"learner rank {result.rank} failed in '{result.command}':\n{result.trace}")
        return results

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        per_rank = self.call("train_step", ray.put(samples))
        metrics = {key: grpo.reduce_metric(key, [r[key] for r in per_rank]) for key in per_rank[0]}
        if metrics.get("nonfinite_forward"):
            raise LearnerError("the policy's forward pass gave a NaN or infinite loss on finite inputs (the weights or "
                               "activations overflowed); lower learner.lr, keep model.learner_dtype=float32, and resume "
                               "from the last checkpoint")
        if metrics.get("nonfinite_weights"):
            raise LearnerError(f"the weights or the gradient norm (grad norm {metrics.get('grad_norm', float('nan')):.4g}) "
                               "went NaN or infinite in this update; lower learner.lr or learner.grad_clip, and resume "
                               "from the last checkpoint (its weights are finite)")
        self.nonfinite_streak = self.nonfinite_streak + 1 if metrics["skipped_nonfinite"] else 0
        limit = self.config.learner.max_nonfinite_steps
        if self.nonfinite_streak >= limit:
            raise LearnerError(f"the loss was NaN or infinite in {self.nonfinite_streak} steps in a row "
                               f"(learner.max_nonfinite_steps = {limit}); lower learner.lr or check the rewards")
        return metrics

    def logprobs(self, samples: list[Sample]) -> list[list[float]]:
        per_rank = self.call("logprobs", ray.put(samples))
        world = len(per_rank)
        ordered = [None] * len(samples)
        for rank, values in enumerate(per_rank):
            ordered[rank::world] = values
        return ordered

    def export_weights(self, bucket_bytes: int, dtype_name: str) -> dict:
        return self.call("export_weights", bucket_bytes, dtype_name)[0]

    def save_policy(self, path: str | os.PathLike, dtype_name: str | None = None) -> str:
        """The policy in Hugging Face format, in ``dtype_name`` (default: ``checkpoint.policy_dtype``)."""
        return self.call("save_policy", str(path), dtype_name)[0]

    def save_adapter(self, path: str | os.PathLike) -> str:
        """LoRA runs: the adapter in PEFT format."""
        return self.call("save_adapter", str(path))[0]

    def memory(self, reset: bool = False) -> list[dict]:
        """Every rank's ``PolicyTrainer.memory`` (GiB), in rank order."""
        return self.call("memory", reset)

    def save_checkpoint(self, directory: str | os.PathLike) -> None:
        self.call("save_checkpoint", str(directory))

    def load_checkpoint(self, directory: str | os.PathLike) -> None:
        self.call("load_checkpoint", str(directory))

    def report_checkpoint(self, checkpoint_dir: str | os.PathLike, iteration: int) -> None:
        """Tell Ray Train which checkpoint a restarted group must start from."""
        self.call("report_checkpoint", str(checkpoint_dir), iteration)

    def acknowledge_restart(self) -> dict | None:
        """After ``LearnerRestarted``: drive the new group from now on. Returns the checkpoint it
        restarted from ({"path", "iteration"}), or None if none was registered (initial weights)."""
        ray.get(self.channel.acknowledge_restart.remote())
        self.infos = self.call("ping")
        self.nonfinite_streak = 0
        return self.infos[0]["restored_from"]

    def shutdown(self) -> None:
        try:
            ray.get(self.channel.acknowledge_restart.remote())  # a group restarting now gets the stop too
            self.call("stop", timeout_s=60)
            ray.get(self.fit_ref, timeout=60)
        except Exception:
            pass
        ray.kill(self.channel)

    def kill(self) -> None:
        """Tear the group down at once, wherever its start-up stands (Ray Train's controller and
        ranks are owned by the fit task and die with it)."""
        ray.cancel(self.fit_ref, force=True)
        ray.kill(self.channel)
