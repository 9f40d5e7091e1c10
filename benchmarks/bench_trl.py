"""dynalign's iteration against TRL's GRPOTrainer on the real default model, side by side.

    python -m benchmarks.bench_trl [--quick] [--out FILE]

Not part of `make bench` (it alone takes ~10 minutes here); its result goes to --out or stdout.

Same model (SmolLM2-135M-Instruct, built by `dynalign fetch-model` under outputs/models), same
prompts (configs/prompts/smoke_prompts.jsonl, 4 per iteration), same group size (4), same answer
length (96 new tokens, temperature 1), the same rule reward on both sides (completion length /
96: no judge model, so both sides do the same work per step), one optimizer step per iteration
on all 16 completions with micro-batches of 2, lr 3e-5, beta 0. dynalign runs as the main job
does (configs/smollm2_cpu.yaml: vLLM engine, its learner ranks, weight sync each iteration); TRL
runs its GRPOTrainer on the CPU (transformers `generate`), one process, with the main job's
attention kernel (`model.attn_implementation`). The two legs run one after
the other in this run, each in a process of its own.

TRL is not a dependency of dynalign: it is installed into the benchmark's own directory
(outputs/bench/trl-site, `pip install --no-deps --target`; its own requirements - transformers,
accelerate, datasets - are already ours) and put on the TRL leg's PYTHONPATH only.

Figure: dynalign's seconds per iteration / TRL's seconds per step, the first step of each side
left out (warm-up), paired step by step. Target <= 0.6 (issue 15).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import bench_main, bench_result, check, figure, series
from dynalign.config import cpu_has_bf16_matmul, load_config

NAME, TITLE = "trl", "dynalign iteration vs TRL GRPOTrainer step, SmolLM2-135M-Instruct"
TARGET = ("<=", 0.6)
REPO = Path(__file__).resolve().parent.parent
TRL_VERSION = "1.16.0"
MODEL = REPO / "outputs" / "models" / "smollm2-135m-instruct"
PROMPTS = REPO / "configs" / "prompts" / "smoke_prompts.jsonl"
PROMPTS_PER_STEP, GROUP, NEW_TOKENS, LR, MICRO = 4, 4, 96, 3e-5, 2

# The TRL leg, run with outputs/bench/trl-site on PYTHONPATH: argv = model, prompts, steps, out.
TRL_SCRIPT = r'''
import json, sys, time
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

model, prompts_path, steps, out, prompts_per_step, group, new_tokens, lr, micro, bf16, attn = sys.argv[1:12]
prompts_per_step, group, new_tokens, micro, steps = map(int, (prompts_per_step, group, new_tokens, micro, steps))
rows = [json.loads(line) for line in open(prompts_path)]
dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows])

def length_reward(completions, completion_ids, **kwargs):
    return [len(ids) / new_tokens for ids in completion_ids]

class StepTimes(TrainerCallback):
    def __init__(self):
        self.marks = []
    def on_step_begin(self, args, state, control, **kwargs):
        if not self.marks:
            self.marks.append(time.perf_counter())
    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter())

accumulation = prompts_per_step * group // micro
config = GRPOConfig(output_dir=out + ".trainer", use_cpu=True, bf16=bf16 == "bfloat16", fp16=False, seed=0,
                    per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
                    num_generations=group, max_completion_length=new_tokens, temperature=1.0,
                    learning_rate=float(lr), lr_scheduler_type="constant", beta=0.0, num_iterations=1, max_steps=steps,
                    logging_steps=1, save_strategy="no", report_to="none", shuffle_dataset=False,
                    dataloader_num_workers=0, disable_tqdm=True, model_init_kwargs={"attn_implementation": attn})
times = StepTimes()
trainer = GRPOTrainer(model=model, reward_funcs=length_reward, args=config, train_dataset=dataset, callbacks=[times])
trainer.train()
seconds = [b - a for a, b in zip(times.marks, times.marks[1:])]
rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
json.dump({"step_seconds": seconds, "rewards": rewards}, open(out, "w"))
'''


def _run(command: list[str], env: dict, log: Path, timeout: float) -> None:
    with log.open("w") as out:
        done = subprocess.run(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... exited {done.returncode}: {log.read_text()[-3000:]}")


def install_trl(site: Path) -> None:
    """TRL into its own directory (cached): never into the project's environment."""
    if (site / "trl" / "__init__.py").exists():
        return
    subprocess.run([sys.executable, "-m", "pip", "install", "-qq", "--no-deps", "--target", str(site),
                    f"trl=={TRL_VERSION}"], check=True)


def _pair(work: Path, site: Path, env: dict, steps: int, precision: str, attn: str) -> tuple[list, list, dict]:
    """One dynalign run and one TRL run, one after the other, learners in ``precision``, attention
    by ``attn`` on both sides."""
    work.mkdir(parents=True, exist_ok=True)
    # dynalign, as the main job runs, with the rule reward instead of the self-judge.
    run_dir = work / "dynalign_run"
    started = time.perf_counter()
    _run([sys.executable, "-m", "dynalign.cli", "train", "--config", str(REPO / "configs/smollm2_cpu.yaml"),
          f"model.path={MODEL}", f"run_dir={run_dir}", "--overwrite", f"iterations={steps}",
          "generation.enabled=false", f"data.prompts_path={PROMPTS}", f"data.prompts_per_iteration={PROMPTS_PER_STEP}",
          f"rollout.group_size={GROUP}", f"rollout.max_new_tokens={NEW_TOKENS}", "rollout.temperature=1.0",
          "judge.kind=rule", "judge.rule=length", f"learner.lr={LR}", f"learner.micro_batch_size={MICRO}",
          f"model.learner_dtype={precision}", "learner.drop_tied_groups=false", "logging.report=false",
          "logging.backends=[]", "logging.progress=false"], env, work / "dynalign.log", timeout=1800)
    dynalign_wall = time.perf_counter() - started
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    # TRL's GRPOTrainer, same model, prompts, sizes, reward, precision and attention kernel.
    trl_out = work / "trl.json"
    trl_env = {**env, "PYTHONPATH": os.pathsep.join([str(site), str(REPO), env.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    _run([sys.executable, "-c", TRL_SCRIPT, str(MODEL), str(PROMPTS), str(steps), str(trl_out),
          str(PROMPTS_PER_STEP), str(GROUP), str(NEW_TOKENS), str(LR), str(MICRO), precision, attn], trl_env,
         work / "trl.log", timeout=1800)
    trl_wall = time.perf_counter() - started
    trl = json.loads(trl_out.read_text())

    ours, theirs = [m["time.total"] for m in metrics][1:], trl["step_seconds"][1:]
    leg = {"dynalign_phases_s": {key: [m[key] for m in metrics][1:] for key in metrics[0] if key.startswith("time.")},
           "dynalign_all_seconds": [m["time.total"] for m in metrics], "trl_all_seconds": trl["step_seconds"],
           "dynalign_wall_s": dynalign_wall, "trl_wall_s": trl_wall,
           "dynalign_learner_step_s": [m.get("learner.step_seconds") for m in metrics],
           "dynalign_reward_mean": [m["reward_mean"] for m in metrics], "trl_reward_mean": trl["rewards"],
           "dynalign_tokens": [m.get("learner.tokens") for m in metrics]}
    return ours, theirs, leg


def run(quick: bool = False) -> dict:
    steps = 3 if quick else 5  # the first of each side is warm-up
    work = REPO / "outputs" / "bench" / "trl"
    work.mkdir(parents=True, exist_ok=True)
    if not (MODEL / "config.json").exists():
        subprocess.run([sys.executable, "-m", "dynalign.cli", "fetch-model", "smollm2-135m-instruct", str(MODEL)],
                       check=True, cwd=REPO)
    site = REPO / "outputs" / "bench" / "trl-site"
    install_trl(site)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(TOKENIZERS_PARALLELISM="false", VLLM_CPU_KVCACHE_SPACE="1")

    # Float32 on both sides; where this CPU multiplies bf16 in hardware, bf16 mixed precision on
    # both sides too (dynalign: model.learner_dtype=bfloat16; TRL: bf16=True, torch autocast).
    precisions = ["float32"] + (["bfloat16"] if cpu_has_bf16_matmul() else [])
    main_job = load_config(REPO / "configs" / "smollm2_cpu.yaml")
    attn = main_job.model.attn_implementation
    figures, checks, details = [], [], {"steps": steps, "prompts_per_step": PROMPTS_PER_STEP, "group": GROUP,
                                        "new_tokens": NEW_TOKENS, "trl_version": TRL_VERSION,
                                        "learner_ranks": main_job.learner.num_ranks, "attn_implementation": attn}
    for precision in precisions:
        ours, theirs, leg = _pair(work / precision, site, env, steps, precision, attn)
        details[precision] = leg
        checks += [check(f"{precision}: dynalign ran every iteration", len(leg["dynalign_all_seconds"]) == steps,
                         f"{len(leg['dynalign_all_seconds'])} of {steps}"),
                   check(f"{precision}: TRL ran every step", len(leg["trl_all_seconds"]) == steps,
                         f"{len(leg['trl_all_seconds'])} of {steps}")]
        suffix = "" if precision == "float32" else "_bf16"
        figures.append(figure(f"dynalign_over_trl{suffix}", f"dynalign iteration / TRL GRPOTrainer step, {precision} learners",
                              series("dynalign seconds per iteration", "s", ours),
                              series("TRL seconds per step", "s", theirs), TARGET,
                              note="lower is better; same model, prompts, G, lengths, rule reward, learner "
                                   "precision and attention kernel; first step left out"))
    return bench_result(NAME, TITLE, figures, checks, details)


if __name__ == "__main__":
    bench_main(NAME, TITLE, run)
