"""Benchmark 2, weight sync: a ~0.5B model from the learner into one rollout and one judge engine.

    python -m benchmarks.bench_sync [--quick] [--out FILE]

Model: Qwen2.5-0.5B's architecture (Qwen2, hidden 896, 24 layers, 14 heads of 64, 2 KV heads,
intermediate 4864, vocab 151936, tied embeddings: 494M parameters, 0.99 GB in bf16), random init,
built locally with the project's locally trained tokenizer (320 tokens; the embedding keeps the
real vocabulary size, so the parameter count is the real one). Two copies are written once and
cached under ``outputs/bench/``: A (seed 0), what the engines start with, and B (seed 1), what the
learner holds, so every sync really changes the engines' weights.

Baseline (a child process, so its memory is gone before the Ray side starts): model B in fp32 in
this process and one ``vllm.LLM`` on A in this process; per repeat: cast to bf16, put in the wire
format once (``dynalign.buckets.to_wire``: byte views, no copy), stage and reload into the engine (the same worker extension the actors use).

System: local Ray; the learner's rank 0 holding B in fp32 (``ExportLearner``: the learner's own
export code in one actor, without Ray Train and DeepSpeed, which do not fit in memory beside two
0.5B engines mid-sync on this machine); a ``RolloutPool`` engine and a dedicated policy judge
engine (``make_judge``), both on A; ``WeightSync.sync`` as the driver calls it (rank 0 exports bf16
buckets of ``sync.bucket_mb`` into the object store, both engines stage and reload). Both sides warm up once, then ``repeats`` timed syncs each.

Checks: after the sync both engines' prompt log-probs on a probe sequence equal those of the
baseline engine after its reload (same bf16 weights, same engine code) and differ from before
the sync; they match the learner's own fp32 log-probs (``LearnerGroup.logprobs``) within bf16
noise; the bytes moved equal the model's bf16 size per engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    CACHE_DIR,
    REPO,
    RssSampler,
    bench_config,
    bench_main,
    bench_result,
    check,
    figure,
    in_process_vllm_pids,
    init_ray,
    series,
    set_env,
    vllm_worker_affinity,
)

NAME, TITLE = "weight_sync", "Weight sync of a 0.5B model into rollout + judge engines vs in-process reload"
TARGET = ("<=", 2.5)
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
                 tie_word_embeddings=True, rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"})
PROBE_TEXT = "Knowledge, benevolence, power and vitality are the four pillars of collective agency. Score: 4"
MAX_MODEL_LEN = 256


def build_model(seed: int) -> str:
    """Qwen2.5-0.5B-shaped random model (bf16 safetensors) + the local tokenizer, cached."""
    import shutil

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dynalign.tiny_model import build_tokenizer

    target = CACHE_DIR / f"qwen2-0.5b-random-seed{seed}"
    stamp = target / "bench-spec.json"
    spec = json.dumps({**QWEN2_05B, "seed": seed}, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == spec:
        return str(target)
    tokenizer = build_tokenizer()
    config = Qwen2Config(**QWEN2_05B, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, dtype="bfloat16")
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "bench-spec.json").write_text(spec)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return str(target)


def probe_ids(model_path: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path).encode(PROBE_TEXT)


PROBE_SAMPLING = {"max_tokens": 1, "prompt_logprobs": 0, "temperature": 1.0, "detokenize": False}


def prompt_logprobs(output) -> list[float]:
    """Log-prob of each probe token after the first (vLLM's prompt_logprobs)."""
    ids = list(output.prompt_token_ids)
    return [float(step[token].logprob) for step, token in zip(output.prompt_logprobs[1:], ids[1:])]


# ---------------------------------------------------------------------------------------------
# Baseline: cast once + reload into one engine, in this process
# ---------------------------------------------------------------------------------------------

def baseline(model_a: str, model_b: str, repeats: int) -> dict:
    # The engine core in this process, as in the engine actors (dynalign.engine.engine_env): the
    # buckets reach the worker extension as they are, not through vLLM's msgpack IPC.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    from dynalign.buckets import to_wire
    from dynalign.engine import WORKER_EXTENSION

    sampler = RssSampler(interval_s=0.5, extra=lambda: {"baseline_process": in_process_vllm_pids()}).__enter__()
    llm = LLM(model=model_a, dtype="bfloat16", max_model_len=MAX_MODEL_LEN, enforce_eager=True, seed=0,
              worker_extension_cls=WORKER_EXTENSION, logprobs_mode="processed_logprobs")
    probe = probe_ids(model_a)

    def run_probe():
        out = llm.generate([{"prompt_token_ids": probe}], SamplingParams(**PROBE_SAMPLING), use_tqdm=False)
        return prompt_logprobs(out[0])

    before = run_probe()
    learner_side = AutoModelForCausalLM.from_pretrained(model_b, dtype=torch.float32)  # what the learner holds

    def reload_once():
        started = time.perf_counter()
        state = {name: p.detach().to(torch.bfloat16).contiguous() for name, p in learner_side.named_parameters()}
        wire = to_wire(state)
        cast_done = time.perf_counter()
        llm.collective_rpc("dynalign_stage_weights", args=(wire,))
        staged = time.perf_counter()
        llm.collective_rpc("dynalign_apply_staged_weights")
        done = time.perf_counter()
        return done - started, (cast_done - started, staged - cast_done, done - staged), sum(t.nbytes for t in state.values())

    warmup, _, size = reload_once()
    seconds, parts = [], []
    for _ in range(repeats):
        total, split, size = reload_once()
        seconds.append(total)
        parts.append(split)
    cast = [p[0] for p in parts]
    after = run_probe()
    memory = sampler.stop()
    params = sum(p.numel() for p in learner_side.parameters())
    return {"seconds": seconds, "cast_seconds": cast, "stage_seconds": [p[1] for p in parts],
            "apply_seconds": [p[2] for p in parts], "warmup_seconds": warmup, "bytes": size,
            "worker_affinity": vllm_worker_affinity(),
            "probe_before": before, "probe_after": after, "params": params, "peak_rss_mib": memory,
            "machine_delta_mib": sampler.machine_delta_mib()}


# ---------------------------------------------------------------------------------------------
# The system: LearnerGroup -> WeightSync -> rollout + judge engine actors
# ---------------------------------------------------------------------------------------------

def run(quick: bool = False) -> dict:
    import psutil

    repeats = 2 if quick else 3
    available = psutil.virtual_memory().available / 2**30
    if available < 17:
        raise RuntimeError(f"weight_sync needs about 17 GiB of free memory at its peak; {available:.1f} GiB available")
    model_a, model_b = build_model(0), build_model(1)

    # Baseline in a child process: its engine and fp32 model are gone before Ray starts.
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "baseline.json"
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_sync", "--baseline", model_a, model_b,
                               str(repeats), str(out)], cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"baseline failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        base = json.loads(out.read_text())
        base["wall_seconds"] = time.perf_counter() - started
    system = system_side(model_a, model_b, repeats)

    sync_s = [s["sync_seconds"] for s in system["syncs"]]
    engines = 2
    model_bytes = base["bytes"]
    moved = [s["sync_bytes"] for s in system["syncs"]]
    gap_vs_baseline = max(max(abs(a - b) for a, b in zip(p, base["probe_after"])) for p in system["probe_after"])
    # The same weights before any sync: what the engines and the baseline differ by anyway
    # (bf16 kernels with a different thread count sum in a different order).
    gap_before = max(max(abs(a - b) for a, b in zip(p, base["probe_before"])) for p in system["probe_before"])
    changed = min(max(abs(a - b) for a, b in zip(p, q)) for p, q in zip(system["probe_after"], system["probe_before"]))
    learner_gap = max(max(abs(a - b) for a, b in zip(p, system["learner_logprobs"])) for p in system["probe_after"])
    learner_gap_before = max(max(abs(a - b) for a, b in zip(p, system["learner_logprobs"]))
                             for p in system["probe_before"])
    checks = [
        check("engines after sync == baseline engine after reload (probe log-probs)",
              gap_vs_baseline <= max(1e-3, 2 * gap_before),
              f"max |diff| {gap_vs_baseline:.2e}; {gap_before:.2e} on the initial weights, before any sync"),
        check("the sync changed both engines", changed > 0.05, f"min over engines of max |after - before| {changed:.3f}"),
        check("engines match the learner's fp32 log-probs (bf16 noise)", learner_gap < 0.1 and learner_gap < learner_gap_before / 3,
              f"max |engine - learner| {learner_gap:.3f} after, {learner_gap_before:.3f} before the sync"),
        check("bytes moved == model bf16 size x engines", all(abs(m - model_bytes * engines) <= 1e-3 * m for m in moved),
              f"{moved[0]:.0f} B moved vs {model_bytes} B x {engines}"),
    ]
    details = {
        "model": f"Qwen2.5-0.5B architecture, random init, {base['params'] / 1e6:.0f}M parameters, bf16 on the engines, "
                 "fp32 on the learner",
        "bytes_per_engine": model_bytes, "engines": engines, "repeats": repeats,
        "bucket_mb": system["bucket_mb"], "buckets": system["syncs"][0]["sync_buckets"],
        "learner": "rank 0's own export code (PolicyTrainer.export_weights) on the fp32 model in one Ray actor, "
                   "without Ray Train/DeepSpeed (see ExportLearner); as ZeRO-0/1/2 (ZeRO-3 adds a gather)",
        "machine_memory_rise_mib": {"system": system["machine_delta_mib"], "baseline": base["machine_delta_mib"]},
        "top_processes": system["top_processes"],
        "system_export_seconds": [s["sync_export_seconds"] for s in system["syncs"]],
        "system_gb_per_s": [s["sync_gb_per_s"] for s in system["syncs"]],
        "system_warmup_seconds": system["warmup_seconds"],
        "baseline_cast_seconds": base["cast_seconds"], "baseline_stage_seconds": base["stage_seconds"],
        "baseline_apply_seconds": base["apply_seconds"], "baseline_warmup_seconds": base["warmup_seconds"],
        "vllm_worker_cpu_affinity": {"system": system["worker_affinity"], "baseline": base["worker_affinity"]},
        "baseline_gb_per_s": [model_bytes / s / 1e9 for s in base["seconds"]],
        "baseline_wall_seconds": base["wall_seconds"], "system_startup_seconds": system["startup_seconds"],
        "peak_rss_mib": {**system["peak_rss_mib"], **{f"baseline:{k}": v for k, v in base["peak_rss_mib"].items()}},
        "order": "baseline phase first (child process), then the Ray phase; repeats paired by index",
    }
    figures = [
        figure("sync_over_reload", "0.5B sync to rollout+judge / 1 in-process reload",
               series("WeightSync.sync: learner -> 2 engines", "s", sync_s),
               series("cast once + reload 1 engine, in-process", "s", base["seconds"]), TARGET,
               note=f"{model_bytes / 1e9:.2f} GB per engine"),
        figure("sync_throughput", "sync GB/s / in-process reload GB/s",
               series("WeightSync.sync (bytes to all engines)", "GB/s", [m / s / 1e9 for m, s in zip(moved, sync_s)]),
               series("in-process reload", "GB/s", [model_bytes / s / 1e9 for s in base["seconds"]]),
               note="bytes moved / seconds; the system moves the model once per engine"),
    ]
    rollout_mib = system["peak_rss_mib"].get("rollout")
    engine_base = base["peak_rss_mib"].get("baseline_process")
    if rollout_mib and engine_base:
        figures.append(figure("memory_engine", "rollout actor+engine RSS / in-process baseline",
                              series("rollout actor + vLLM processes (peak)", "MiB", [rollout_mib]),
                              series("baseline process + its vLLM processes (peak)", "MiB", [engine_base]),
                              note="the baseline process also holds the fp32 model (2 GB)"))
    return bench_result(NAME, TITLE, figures, checks, details)


class ExportLearner:
    """Learner rank 0 without Ray Train or DeepSpeed: a ``PolicyTrainer`` whose engine is the
    plain fp32 model, so ``export_weights`` and ``logprobs`` are the learner's own code.

    Why not ``LearnerGroup``: with a 0.5B model, Ray Train's control actors (~1.5 GiB RSS) and
    DeepSpeed on top of two engines mid-sync put this 24 GiB machine over Ray's OOM threshold.
    What the sync times (rank 0 casts the buckets and ``ray.put``s them) is unchanged;
    only the command-channel hop (milliseconds) is missing."""

    def __init__(self, config):
        import torch
        from transformers import AutoTokenizer

        from benchmarks.bench_learner import plain_trainer

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        # The stand-in the learner benchmark uses (kept in step with PolicyTrainer by a test); no
        # optimizer step is taken, so AdamW never allocates its state.
        trainer = plain_trainer(config, AutoTokenizer.from_pretrained(config.model.path), config.model.path)
        self.trainer = trainer

    def export_weights(self, bucket_bytes: int, dtype_name: str) -> dict:
        return self.trainer.export_weights(bucket_bytes, dtype_name)

    def logprobs(self, samples) -> list[list[float]]:
        return self.trainer.logprobs(samples)

    def pid(self) -> int:
        return os.getpid()


class LearnerHandle:
    """The two ``LearnerGroup`` methods ``WeightSync`` and the check call."""

    def __init__(self, actor):
        self.actor = actor

    def export_weights(self, bucket_bytes: int, dtype_name: str) -> dict:
        import ray

        return ray.get(self.actor.export_weights.remote(bucket_bytes, dtype_name))

    def logprobs(self, samples) -> list[list[float]]:
        import ray

        return ray.get(self.actor.logprobs.remote(samples))


def system_side(model_a: str, model_b: str, repeats: int) -> dict:
    import copy

    import ray

    from dynalign.batch import Sample
    from dynalign.driver import absolute_paths
    from dynalign.judge import make_judge
    from dynalign.rollout import RolloutPool
    from dynalign.weight_sync import WeightSync

    run_dir = tempfile.mkdtemp(prefix="bench-sync-")
    config = absolute_paths(bench_config(
        # bf16 engines, as on GPUs: the baseline side reloads bf16 too, and 1 GB moves per engine.
        model_a, run_dir, "model.dtype=bfloat16", "learner.num_ranks=1", "learner.zero_stage=0", "judge.kind=policy",
        "judge.engine=dedicated",
        "judge.num_workers=1", f"judge.max_model_len={MAX_MODEL_LEN}", f"rollout.max_model_len={MAX_MODEL_LEN}",
        "sync.timeout_s=1800"))
    learner_config = copy.deepcopy(config)
    learner_config.model.path = model_b
    init_ray(num_cpus=max(3, os.cpu_count() or 2))
    sampler = RssSampler(interval_s=0.5).__enter__()
    started = time.perf_counter()
    # One role at a time: loading the copies at once peaks above what this machine holds.
    actor = ray.remote(ExportLearner).options(num_cpus=1).remote(learner_config)
    ray.get(actor.pid.remote())
    learner = LearnerHandle(actor)
    rollout = RolloutPool(config)
    judge = make_judge(config, synced=rollout.synced)  # the dedicated judge's engine joins the sync targets
    startup = time.perf_counter() - started
    engines = rollout.synced.workers
    sync = WeightSync(config, rollout.synced)
    probe = probe_ids(model_a)

    def run_probe():
        outs = ray.get([e.generate_from_token_ids.remote([probe], PROBE_SAMPLING) for e in engines])
        return [prompt_logprobs(o[0]) for o in outs]

    affinity = vllm_worker_affinity()
    try:
        before = run_probe()
        warm = sync.sync(learner, version=1)
        syncs = [sync.sync(learner, version=2 + r) for r in range(repeats)]
        after = run_probe()
        learner_logprobs = learner.logprobs([Sample(prompt_token_ids=probe[:1], completion_token_ids=probe[1:],
                                                    engine_logprobs=[0.0] * (len(probe) - 1), advantage=0.0)])[0]
        memory = sampler.stop()
    finally:
        sampler.stop()
        rollout.shutdown()
        judge.shutdown()
        ray.kill(actor)
        ray.shutdown()
    return {"syncs": syncs, "warmup_seconds": warm["sync_seconds"], "probe_before": before, "probe_after": after,
            "learner_logprobs": learner_logprobs, "peak_rss_mib": memory, "startup_seconds": startup,
            "bucket_mb": config.sync.bucket_mb, "machine_delta_mib": sampler.machine_delta_mib(),
            "top_processes": sampler.top_processes(), "worker_affinity": affinity}


def _baseline_main(argv: list[str]) -> None:
    model_a, model_b, repeats, out = argv
    set_env()
    result = baseline(model_a, model_b, int(repeats))
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--baseline":
        _baseline_main(sys.argv[2:])
    else:
        bench_main(NAME, TITLE, run)
