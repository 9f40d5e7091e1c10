"""Benchmark 1, rollout: the rollout pool's tokens/s through Ray against raw in-process vLLM.

    python -m benchmarks.bench_rollout [--quick] [--out FILE]

One process holds both sides at once: a ``RolloutPool`` (one ``RolloutWorker`` Ray actor with its
vLLM engine) and a ``vllm.LLM`` built in this process with the same engine arguments. Each repeat
runs the same prompts (chat template applied, as the actor does) with the same sampling settings
and seeds through both, back to back, alternating which goes first; a third leg runs Hugging Face
``generate`` on the same prompts for context (vLLM / transformers). Everything is warmed up first.

Checks: the pool returns prompts x G candidates with one finite log-prob per token; with the same
seeds the pool's tokens equal the in-process engine's (the same engine, so the same samples);
transformers produced the expected number of sequences.
Memory: peak RSS of the rollout actor + its vLLM processes against the in-process engine's.
"""

from __future__ import annotations

import math
import os
import time

from benchmarks.common import (
    RssSampler,
    bench_main,
    bench_result,
    chat_prompt_ids,
    check,
    figure,
    in_process_vllm_pids,
    init_ray,
    series,
    tiny_batch_config,
    vllm_worker_affinity,
)

NAME, TITLE = "rollout", "Rollout pool (Ray actor + vLLM) vs in-process vLLM vs transformers generate"
TARGET = (">=", 0.9)


def run(quick: bool = False) -> dict:

    import ray
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    from dynalign.data import load_prompts
    from dynalign.engine import WORKER_EXTENSION
    from dynalign.rollout import RolloutPool

    prompts_n, group, new_tokens, repeats = (4, 4, 32, 2) if quick else (8, 8, 64, 7)
    model, config = tiny_batch_config("rollout", prompts_n, group, new_tokens)
    prompts = load_prompts(config).take(prompts_n)
    checks, details = [], {"prompts": prompts_n, "group_size": group, "max_new_tokens": new_tokens,
                           "repeats": repeats, "model": "tiny Llama (hidden 128, 2 layers, vocab 320), bf16",
                           "sampling": "temperature 1, top_p 1, seeded per prompt, logprobs=0 (what the pool asks)"}

    init_ray(num_cpus=max(2, os.cpu_count() or 2))
    sampler = RssSampler(interval_s=1.0, extra=lambda: {"in_process_vllm": in_process_vllm_pids()}).__enter__()
    pool = RolloutPool(config)
    rollout = config.rollout
    llm = LLM(model=config.model.path, dtype=config.engine_dtype, max_model_len=rollout.max_model_len,
              tensor_parallel_size=1, enforce_eager=rollout.enforce_eager, seed=rollout.seed,
              worker_extension_cls=WORKER_EXTENSION, logprobs_mode="processed_logprobs")
    tokenizer = llm.get_tokenizer()
    prompt_ids = [chat_prompt_ids(tokenizer, text) for _, text in prompts]

    def raw_vllm(iteration: int):
        sampling = {**pool.sampling(iteration), "logprobs": 0}
        seed = sampling.pop("seed")
        params = [SamplingParams(**sampling, seed=seed + i) for i in range(len(prompt_ids))]  # as EngineWorker does
        started = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        seconds = time.perf_counter() - started
        tokens = [[list(c.token_ids) for c in out.outputs] for out in outputs]
        return seconds, tokens

    def via_pool(iteration: int):
        started = time.perf_counter()
        groups = pool.generate(prompts, iteration)
        seconds = time.perf_counter() - started
        return seconds, groups

    hf = AutoModelForCausalLM.from_pretrained(config.model.path, dtype=getattr(torch, config.engine_dtype)).eval()
    pad = tokenizer.pad_token_id
    width = max(map(len, prompt_ids))
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids])  # left padding
    attention = (torch.arange(width)[None, :] >= torch.tensor([width - len(ids) for ids in prompt_ids])[:, None]).long()

    def hf_generate(seed: int):
        torch.manual_seed(seed)
        started = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(input_ids=input_ids, attention_mask=attention, do_sample=True, temperature=1.0, top_p=1.0,
                              top_k=0, max_new_tokens=new_tokens, num_return_sequences=group, pad_token_id=pad,
                              eos_token_id=tokenizer.eos_token_id)
        seconds = time.perf_counter() - started
        completions = out[:, width:]
        tokens = 0
        for row in completions.tolist():  # up to and including the first eos, as vLLM counts
            eos = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            tokens += eos
        return seconds, tokens, completions.shape[0]

    # warm-up (first generate on a fresh engine compiles/allocates)
    via_pool(0)
    raw_vllm(0)
    hf_generate(0)
    pool_tps, raw_tps, hf_tps = [], [], []
    identical, total_candidates, bad_logprobs, hf_rows = 0, 0, 0, []
    for r in range(repeats):
        iteration = 1 + r
        legs = ["pool", "raw", "hf"] if r % 2 == 0 else ["raw", "pool", "hf"]
        for leg in legs:
            if leg == "pool":
                seconds, groups = via_pool(iteration)
                cands = [c for g in groups for c in g.candidates]
                pool_tokens = [list(c.token_ids) for c in cands]
                pool_tps.append(sum(map(len, pool_tokens)) / seconds)
                bad_logprobs += sum(len(c.logprobs) != len(c.token_ids) or not all(map(math.isfinite, c.logprobs))
                                    for c in cands)
                group_sizes = [len(g.candidates) for g in groups]
            elif leg == "raw":
                seconds, raw_tokens = raw_vllm(iteration)
                raw_flat = [t for per_prompt in raw_tokens for t in per_prompt]
                raw_tps.append(sum(map(len, raw_flat)) / seconds)
            else:
                seconds, tokens, rows = hf_generate(iteration)
                hf_tps.append(tokens / seconds)
                hf_rows.append(rows)
        total_candidates += len(pool_tokens)
        identical += sum(a == b for a, b in zip(pool_tokens, raw_flat))
    memory = sampler.stop()
    rollout_role_mib, inproc_mib = memory.get("rollout", 0.0), memory.get("in_process_vllm", 0.0)
    details["identical_candidates"] = f"{identical}/{total_candidates}"

    checks.append(check("pool returns prompts x G candidates", group_sizes == [group] * prompts_n,
                        f"group sizes {group_sizes}"))
    checks.append(check("one finite engine log-prob per token", bad_logprobs == 0, f"{bad_logprobs} bad candidates"))
    checks.append(check("pool samples == in-process vLLM samples (same seeds)", identical == total_candidates,
                        f"{identical}/{total_candidates} candidates token-identical"))
    checks.append(check("transformers returned prompts x G sequences", all(r == prompts_n * group for r in hf_rows),
                        f"rows {hf_rows}"))

    figures = [
        figure("pool_over_vllm", "rollout pool / in-process vLLM (tokens/s)",
               series("RolloutPool.generate via Ray", "tokens/s", pool_tps),
               series("vllm.LLM.generate in-process", "tokens/s", raw_tps), TARGET,
               note="same prompts, sampling and seeds; paired per repeat"),
        figure("vllm_over_hf", "in-process vLLM / transformers generate (tokens/s)",
               series("vllm.LLM.generate in-process", "tokens/s", raw_tps),
               series("transformers generate (bf16, same threads)", "tokens/s", hf_tps),
               note="context only; transformers pads every row to the longest"),
    ]
    if rollout_role_mib and inproc_mib:
        figures.append(figure("memory_rollout", "rollout actor+engine RSS / in-process engine",
                              series("rollout actor + vLLM processes (peak)", "MiB", [rollout_role_mib]),
                              series("this process + its vLLM processes (peak)", "MiB", [inproc_mib]),
                              note="this process also holds transformers' copy of the tiny model"))
    details["peak_rss_mib"] = memory
    details["ray_worker_niceness"] = os.environ.get("RAY_worker_niceness")
    details["vllm_worker_cpu_affinity"] = vllm_worker_affinity()
    pool.shutdown()
    ray.shutdown()
    return bench_result(NAME, TITLE, figures, checks, details)


if __name__ == "__main__":
    bench_main(NAME, TITLE, run)
