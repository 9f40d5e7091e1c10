"""vLLM generation in float32 against bf16 on the real default model, side by side.

    python -m benchmarks.bench_engine_dtype [--quick] [--out FILE]

Not part of `make bench` (it needs the real model, `make model`). Why it exists: `model.dtype=auto`
(`TrainConfig.engine_dtype`) gives CPU engines float32 where the CPU has no native bf16 kernels
(oneDNN: AVX-512 or Arm BF16) and bf16 where it has them; this benchmark measures the choice on
the machine at hand.

Two `vllm.LLM` engines live in this process at once, one per dtype, with the engine settings the
rollout uses (eager, no chunked prefill, one process). Each repeat generates the same answers
(4 chat-templated prompts x G=4, exactly 96 new tokens: `min_tokens` = `max_tokens`, so both sides
produce the same number of tokens whatever they sample) with the same seeds on both, back to
back, alternating which goes first. Everything is warmed up first.

Figure: float32 tokens/s / bf16 tokens/s, paired repeat by repeat. No target: on a CPU with
native bf16 it is expected below 1, without it above 1; `auto` is right when the figure is above 1
exactly where `cpu_has_native_bf16()` is False. That agreement is the check.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from benchmarks.common import bench_main, bench_result, check, figure, series

NAME, TITLE = "engine_dtype", "vLLM generation: float32 vs bf16 engine on this CPU (SmolLM2-135M-Instruct)"
MODEL = Path(__file__).resolve().parent.parent / "outputs" / "models" / "smollm2-135m-instruct"
QUESTIONS = ("How can a community share what it knows more widely?", "What does it mean to act with benevolence?",
             "How should a person use the power they have?", "What keeps a neighbourhood full of life?")


def run(quick: bool = False) -> dict:
    import torch
    from vllm import LLM, SamplingParams

    from dynalign.config import cpu_has_native_bf16
    from dynalign.model_fetch import check_model_dir

    if torch.cuda.is_available():
        return bench_result(NAME, TITLE, error="this benchmark measures CPU engines; a GPU is visible")
    check_model_dir(str(MODEL), "bench_engine_dtype.MODEL", "run `make model` first")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    group, new_tokens, repeats = (4, 96, 2) if quick else (4, 96, 4)
    engines = {dtype: LLM(model=str(MODEL), dtype=dtype, max_model_len=1024, enforce_eager=True,
                          enable_chunked_prefill=False, distributed_executor_backend="uni", seed=0)
               for dtype in ("float32", "bfloat16")}
    tokenizer = engines["float32"].get_tokenizer()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in QUESTIONS]
    sampling = SamplingParams(n=group, temperature=1.0, max_tokens=new_tokens, min_tokens=new_tokens, seed=1, logprobs=0)
    for engine in engines.values():
        engine.generate(prompts, sampling, use_tqdm=False)

    tokens_per_s: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    texts: dict[str, list[str]] = {}
    for repeat in range(repeats):
        order = ("float32", "bfloat16") if repeat % 2 == 0 else ("bfloat16", "float32")
        for dtype in order:
            started = time.perf_counter()
            outputs = engines[dtype].generate(prompts, sampling, use_tqdm=False)
            seconds = time.perf_counter() - started
            answers = [c for o in outputs for c in o.outputs]
            tokens_per_s[dtype].append(sum(len(a.token_ids) for a in answers) / seconds)
            texts[dtype] = [a.text for a in answers]

    native = cpu_has_native_bf16()
    speedup = [f / b for f, b in zip(tokens_per_s["float32"], tokens_per_s["bfloat16"])]
    auto_right = all(s > 1 for s in speedup) != native
    same_text = sum(a == b for a, b in zip(texts["float32"], texts["bfloat16"]))
    return bench_result(
        NAME, TITLE,
        figures=[figure("float32_over_bf16", "float32 engine / bf16 engine (tokens/s)",
                        series("float32", "tokens/s", tokens_per_s["float32"]),
                        series("bfloat16", "tokens/s", tokens_per_s["bfloat16"]),
                        note=f"cpu_has_native_bf16() = {native}: auto picks {'bfloat16' if native else 'float32'}")],
        checks=[check("both engines wrote every answer in full",
                      all(len(t) == len(QUESTIONS) * group for t in texts.values())),
                check("auto's choice is the faster dtype here", auto_right,
                      f"float32/bf16 per repeat {[round(s, 2) for s in speedup]}, native bf16 {native}")],
        details={"prompts": len(QUESTIONS), "group_size": group, "new_tokens": new_tokens, "repeats": repeats,
                 "answers_identical_across_dtypes": f"{same_text}/{len(QUESTIONS) * group}"})


if __name__ == "__main__":
    bench_main(NAME, TITLE, run)
