"""Typed configuration: the dataclasses below are the one source of truth for every option.

YAML files (``configs/*.yaml``) and command-line ``key=value`` overrides only change these
defaults. Precedence: defaults < YAML < command line. Anything unknown, mistyped or out of range
is refused before work starts, with one line naming the key, the value, where it came from and
what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from omegaconf import OmegaConf

from dynalign.learner_config import LearnerConfig, LoraConfig  # noqa: F401 (re-exported)
from dynalign.options import ConfigError, RunError, opt  # noqa: F401 (re-exported: dynalign imports them from here)


@dataclass
class ModelConfig:
    path: str = opt("outputs/tiny-model", "Policy model: local directory in Hugging Face format (or hub id on machines with hub access).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = opt("auto", "Weights dtype of the inference engines (vLLM); auto: bfloat16 on GPUs and on CPUs with bf16 kernels (oneDNN: AVX-512, Arm BF16), else float32.")
    learner_dtype: Literal["auto", "bfloat16", "float32"] = opt("float32", "Learner dtype: float32, or bfloat16 mixed precision (bf16 weights and matmuls, float32 master weights in the optimizer); auto: bfloat16 on GPUs and on CPUs with bf16 matrix units (AMX, AVX512-BF16), else float32.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = opt("sdpa", "The learner's attention kernel (transformers' attn_implementation): sdpa (torch's fused attention), eager (matmul + softmax: faster for short bf16 sequences on CPU, memory quadratic in length), flash_attention_2 (GPUs with flash-attn installed).")
    trust_remote_code: bool = opt(False, "Allow custom modelling code from the model directory.")


@dataclass
class DataConfig:
    prompts_path: str = opt("configs/prompts/smoke_prompts.jsonl", "Training prompts: a JSONL or Parquet file with one prompt per row.")
    prompt_key: str = opt("prompt", "Column that holds the prompt text.")
    id_key: str = opt("id", "Column that holds a stable prompt id (row index is used when absent).")
    prompts_per_iteration: int = opt(8, "Prompts (groups) trained on per iteration.", min=1)
    max_prompt_tokens: int = opt(128, "Longest prompt in tokens, chat template included.", min=1)
    on_long_prompt: Literal["skip", "error"] = opt("skip", "What to do with a prompt longer than max_prompt_tokens: skip and count it (skip), or refuse the run (error).")
    shuffle: bool = opt(True, "Shuffle prompt order (seeded) before each pass over the dataset.")


@dataclass
class RolloutConfig:
    num_workers: int = opt(1, "Rollout actors, each owning one vLLM engine.", min=1)
    group_size: int = opt(8, "G: candidate answers sampled per prompt.", min=2)
    max_new_tokens: int = opt(32, "Longest candidate answer in tokens.", min=1)
    temperature: float = opt(1.0, "Sampling temperature (the learner scales logits the same way).", min=0.0, min_exclusive=True)
    top_p: float = opt(1.0, "Nucleus sampling mass; keep 1.0 for unbiased GRPO log-probs.", min=0.0, max=1.0, min_exclusive=True)
    max_model_len: int = opt(256, "vLLM context length (prompt + answer).", min=16)
    tensor_parallel_size: int = opt(1, "vLLM tensor parallel size; one engine's ranks stay on one node.", min=1)
    gpu_memory_utilization: float = opt(0.5, "Share of GPU memory vLLM may take (ignored on CPU).", min=0.0, max=1.0, min_exclusive=True)
    enforce_eager: bool = opt(True, "Disable CUDA graphs / compilation (faster start, slower decode).")
    cpu_kv_cache_gib: int = opt(1, "KV-cache size in GiB on CPU (VLLM_CPU_KVCACHE_SPACE).", min=1)
    threads_per_engine: int = opt(0, "CPU engines: torch threads of each engine actor, at most its cores; 0: Ray's OMP_NUM_THREADS, i.e. num_cpus_per_worker (vLLM runs in the actor's process).", min=0)
    num_cpus_per_worker: float = opt(1.0, "CPUs Ray reserves per rollout actor.", min=0.0)
    num_gpus_per_worker: float = opt(0.0, "GPUs per tensor-parallel rank of a rollout engine: an engine takes tensor_parallel_size bundles of this on one node; a fraction below 1 shares a GPU between roles.", min=0.0)
    seed: int = opt(0, "Base sampling seed; each iteration and worker derives its own.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = opt("PACK", "How Ray places rollout engines across nodes (one engine's tensor-parallel bundles always share a node).")
    resources: dict = opt({}, "Extra custom Ray resources per rollout bundle, e.g. {rollout_node: 1} to pin engines to nodes started with that resource.")
    sleep_while_learning: bool = opt(False, "GPU only: put every engine to sleep (vLLM sleep mode level 1: weights to host memory, KV cache freed) while the learner steps, so roles can share GPUs.")
    max_staleness: int = opt(0, "Off-policy overlap: 0 generates and judges each iteration's groups before its learner step (synchronous); >= 1 generates and judges the next iteration's on the engines while the learner steps (one step off), and a group from weights more than this many versions behind the learner is dropped and regenerated.", min=0)


@dataclass
class JudgeConfig:
    kind: Literal["policy", "rule", "external_vllm", "openai"] = opt("policy", "policy: the policy scores its own candidates (self-rewarding); external_vllm: a fixed model (model_path) in judge engines of its own, never synced; openai: an OpenAI-compatible chat endpoint (base_url, api_model); rule: a rule-based reward for tests.")
    mode: Literal["logprob", "generate", "group"] = opt("logprob", "logprob: expected score from the next-token distribution over score tokens after 'Score:' (one forward pass); generate: a short justification then 'Score: N', `repeats` samples averaged; group: all G candidates of a prompt in one prompt, one 'Candidate K: Score: N' line each, order reshuffled per repeat. See docs/judge.md.")
    engine: Literal["shared", "dedicated"] = opt("shared", "kind=policy: shared judges on the rollout engines (no second copy of the weights); dedicated starts num_workers judge engines, synced with the policy too.")
    repeats: int = opt(3, "Judgements averaged per candidate in generate and group modes (logprob is deterministic: 1).", min=1)
    per_pillar: bool = opt(False, "Score every pillar of the value separately ('Score (Pillar): N') and aggregate them with pillar_aggregation, instead of one additive rubric score.")
    pillar_aggregation: Literal["mean", "min"] = opt("mean", "per_pillar: mean (weighted by the spec's rubric.pillar_weights) or min of the pillar scores.")
    max_retries: int = opt(2, "Re-asks of a judgement whose output has no well-formed score or whose request failed or timed out; after them it is invalid (NaN, left out of the advantages, counted).", min=0)
    retry_backoff_s: float = opt(1.0, "Back-off before re-asking after failed requests, doubled per retry (capped at 30 s).", min=0.0)
    call_timeout_s: float = opt(1800.0, "A judge call on an engine actor that takes longer leaves its groups invalid instead of hanging.", min=0.0, min_exclusive=True)
    length_control: Literal["none", "penalty", "regress"] = opt("none", "Reward shaping against length inflation: penalty subtracts length_coef * length / rollout.max_new_tokens; regress removes the batch's positive least-squares trend of score on length.")
    length_coef: float = opt(0.5, "length_control=penalty: score points taken from an answer of rollout.max_new_tokens tokens.", min=0.0)
    model_path: str | None = opt(None, "kind=external_vllm: the judge model's directory (Hugging Face format).")
    base_url: str | None = opt(None, "kind=openai: endpoint base URL, e.g. http://127.0.0.1:8000/v1.")
    api_model: str | None = opt(None, "kind=openai: model name sent with each request.")
    api_key_env: str | None = opt(None, "kind=openai: environment variable holding the API key (None: no key).")
    max_concurrency: int = opt(8, "kind=openai: requests in flight at once.", min=1)
    timeout_s: float = opt(60.0, "kind=openai: timeout of one request in seconds (then it is re-asked, see max_retries).", min=0.0, min_exclusive=True)
    value_spec: str = opt("configs/values/collective_agency.yaml", "Value specification (YAML) the judge scores against.")
    num_workers: int = opt(1, "Judge-only engine actors (engine=dedicated or kind=external_vllm), each owning one vLLM engine.", min=1)
    score_min: int = opt(0, "Lowest score on the rubric scale.")
    score_max: int = opt(5, "Highest score on the rubric scale.", min=1)
    max_new_tokens: int = opt(96, "Longest judge answer in tokens (group mode adds 16 per candidate and pillar).", min=1)
    max_model_len: int = opt(2048, "Context length of judge engines (and of the rollout engines when engine=shared): rubric + question + answer(s) + judgement.", min=16)
    temperature: float = opt(0.7, "Judge sampling temperature in generate/group modes; repeats and re-asks are independent samples only above 0.", min=0.0)
    num_cpus_per_worker: float = opt(1.0, "CPUs Ray reserves per judge actor.", min=0.0)
    num_gpus_per_worker: float = opt(0.0, "GPUs per tensor-parallel rank of a judge engine (judge engines use rollout.tensor_parallel_size and the other rollout.* vLLM settings).", min=0.0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = opt("PACK", "How Ray places judge engines across nodes.")
    resources: dict = opt({}, "Extra custom Ray resources per judge bundle, e.g. {judge_node: 1}.")
    rule: Literal["target_token_share", "length"] = opt("target_token_share", "Rule for kind=rule: share of answer tokens that are one of `rule_targets`, or answer length / max_new_tokens.")
    rule_targets: list = opt(list("0123456789"), "Strings whose single-token encodings the target_token_share rule rewards.")

    @property
    def uses_shared_engines(self) -> bool:
        """The policy judges on the rollout engines (no engines of its own)."""
        return self.kind == "policy" and self.engine == "shared"

    @property
    def engines_synced(self) -> bool:
        """Whether the judge's own engines receive the policy's weights: only dedicated policy judges.
        (Shared engines are the rollout engines, synced anyway; external judges keep their model.)"""
        return self.kind == "policy" and self.engine == "dedicated"

    @property
    def actor_count(self) -> int:
        """Judge-only engine actors a run starts: none for shared engines, the openai and rule kinds."""
        return self.num_workers if self.engines_synced or self.kind == "external_vllm" else 0

    def check(self) -> None:
        """Rules that span judge fields."""
        needs = {"external_vllm": ("model_path",), "openai": ("base_url", "api_model")}.get(self.kind, ())
        for name in needs:
            if not getattr(self, name):
                raise ConfigError(f"judge.{name} = None: judge.kind={self.kind} needs {' and '.join(f'judge.{n}' for n in needs)}")
        if self.kind == "openai" and self.mode == "logprob":
            raise ConfigError("judge.mode = logprob with judge.kind = openai: an endpoint returns text, not the engine's "
                              "score-token distribution; use judge.mode=generate or group")


@dataclass
class SyncConfig:
    backend: Literal["auto", "reload", "nccl"] = opt("auto", "reload: serialise + vLLM in-place reload (CPU); nccl: vLLM's NCCL weight transfer (GPU); auto picks by device.")
    bucket_mb: float = opt(256.0, "Weights move in buckets of about this many MiB (a bucket closes once it reaches it).", min=0.0, min_exclusive=True)
    timeout_s: float = opt(300.0, "A sync that takes longer fails with the engine's name instead of hanging.", min=0.0, min_exclusive=True)


@dataclass
class ClusterConfig:
    address: str | None = opt(None, "Ray address to join (None starts a local Ray).")
    num_cpus: int | None = opt(None, "CPUs for a local Ray (None = all).", min=1)
    runtime_env_dir: str | None = opt(None, "Working directory shipped to a remote cluster (None = none).")
    check_resources: bool = opt(True, "Before starting, check every role's resources fit the cluster's nodes and fail with one line if not; turn off on autoscaling clusters whose nodes appear on demand.")
    placement_timeout_s: float = opt(600.0, "An engine placement group not placed within this many seconds fails, naming the role, instead of pending forever.", min=0.0, min_exclusive=True)
    storage_path: str | None = opt(None, "Ray Train storage: a shared path or s3:// / gs:// URI reachable from every node (None = run_dir/ray_train).")


@dataclass
class CheckpointConfig:
    every: int = opt(0, "Checkpoint every N iterations (0: only at the end).", min=0)
    keep_last: int = opt(2, "Checkpoints kept on disk.", min=1)
    save_final_policy: bool = opt(True, "Save the final policy in Hugging Face format under run_dir/policy.")
    policy_dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt("auto", "dtype of the saved policy (run_dir/policy and each checkpoint's policy/): auto is the dtype in the model's own config.json (float32 when it names none); the learner state keeps float32.")


TRACKER_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}  # tracker -> the package it needs (extra `trackers`)


@dataclass
class LoggingConfig:
    backends: list[Literal["tensorboard", "wandb", "mlflow"]] = opt(["tensorboard"], "Trackers that get every iteration's metrics (and the resolved config, once) besides metrics.jsonl: tensorboard (run_dir/tensorboard), wandb (offline by default: run_dir/wandb), mlflow (a local file store by default: run_dir/mlruns); [] for none. wandb and mlflow need `pip install 'dynalign[trackers]'`.")
    project: str = opt("dynalign", "wandb project and mlflow experiment the run is logged under.")
    run_name: str | None = opt(None, "Run name in wandb and mlflow (None: the name of run_dir's folder).")
    wandb_mode: Literal["offline", "online"] = opt("offline", "wandb: offline writes the run under run_dir/wandb only (`wandb sync` uploads it later); online sends it as it goes (needs network access and `wandb login`).")
    mlflow_tracking_uri: str | None = opt(None, "mlflow: where runs are stored, e.g. http://host:5000 or file:///shared/mlruns (None: a local file store, file://run_dir/mlruns).")
    progress: bool = opt(True, "Show a tqdm progress bar over iterations.")
    log_samples: int = opt(2, "Candidate answers (with scores) written to samples.jsonl per iteration.", min=0)
    report: bool = opt(True, "Write the run report (plots and tables, run_dir/report/index.html) when the run ends.")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = opt("INFO", "dynalign's own console messages at this level and above (`dynalign: ...` on stdout, `dynalign: warning: ...` on stderr).")
    verbose: bool = opt(False, "Show Ray's, vLLM's, DeepSpeed's and transformers' own output on the console (`train --verbose`); otherwise it stays in the Ray session logs, linked as run_dir/logs/ray.")

    def check(self) -> None:
        """Each tracker named once, and its package installed (wandb and mlflow are optional)."""
        import importlib.util

        value = f"logging.backends = [{', '.join(self.backends)}]"
        for backend in self.backends:
            if self.backends.count(backend) > 1:
                raise ConfigError(f"{value}: {backend} is named twice; name each tracker once")
            package = TRACKER_PACKAGES.get(backend)
            if package and importlib.util.find_spec(package) is None:
                raise ConfigError(f"{value}: the {backend} tracker needs the {package} package, which is not installed; "
                                  f"pip install {package} (or pip install 'dynalign[trackers]'), or take {backend} "
                                  "out of logging.backends")

    def set_tensorboard(self, enabled: bool) -> None:
        """``logging.tensorboard``, the option before ``logging.backends``, still accepted: true adds
        tensorboard to the backends, false takes it out."""
        others = [b for b in self.backends if b != "tensorboard"]
        self.backends = ["tensorboard", *others] if enabled else others

    # Former option names still accepted: name -> (type, method that applies the value).
    aliases: ClassVar[dict] = {"tensorboard": (bool, set_tensorboard)}


@dataclass
class GeneratorSpec:
    """One prompt writer (an entry of ``generation.generators``)."""

    source: Literal["policy", "vllm", "openai"] = opt("policy", "policy: the rollout engines (current policy weights); vllm: a separate vLLM engine on model_path; openai: an OpenAI-compatible endpoint.")
    name: str | None = opt(None, "Label recorded with every prompt it writes (default: derived from source and model).")
    persona: str | None = opt(None, "Who this generator writes as, e.g. 'a nurse in a rural clinic' (added to its system prompt); several personas on one model make several agents.")
    model_path: str | None = opt(None, "source=vllm: model directory (Hugging Face format) of the separate engine.")
    base_url: str | None = opt(None, "source=openai: endpoint base URL, e.g. http://127.0.0.1:8000/v1.")
    api_model: str | None = opt(None, "source=openai: model name sent with each request.")
    api_key_env: str | None = opt(None, "source=openai: environment variable holding the API key (None: no key).")
    max_concurrency: int = opt(8, "source=openai: requests in flight at once.", min=1)
    max_retries: int = opt(3, "source=openai: retries of a failed request (connection, timeout, 429, 5xx), with exponential back-off.", min=0)
    timeout_s: float = opt(120.0, "source=openai: timeout of one request in seconds.", min=0.0, min_exclusive=True)


@dataclass
class GenerationConfig:
    enabled: bool = opt(False, "Generate each iteration's prompts (Self-Instruct style, novelty-filtered) instead of reading data.prompts_path, which then only seeds and tops up.")
    generators: list[GeneratorSpec] = field(default_factory=lambda: [GeneratorSpec()], metadata={
        "doc": "Prompt writers, each {source, name, model_path, base_url, api_model, api_key_env, max_concurrency, max_retries, timeout_s} (see docs/data.md); requests go to them in turn."})
    requests_per_iteration: int = opt(8, "Generation requests per iteration, each for one pillar and domain.", min=1)
    prompts_per_request: int = opt(5, "New prompts asked for in one request.", min=1)
    examples_per_request: int = opt(4, "Examples shown per request: about half seeds (value spec, prompts file), half prompts kept earlier.", min=0)
    min_words: int = opt(4, "Drop generated prompts with fewer words.", min=1)
    max_words: int = opt(100, "Drop generated prompts with more words (or more than data.max_prompt_tokens tokens).", min=1)
    novelty_threshold: float = opt(0.7, "Keep a prompt only if its ROUGE-L F against every prompt kept so far (all iterations) is below this.", min=0.0, max=1.0, min_exclusive=True)
    num_workers: int = opt(1, "Novelty filter workers (more only pays off for pools of tens of thousands of prompts).", min=1)
    temperature: float = opt(1.0, "Sampling temperature of the generators.", min=0.0)
    max_new_tokens: int = opt(192, "Longest generator answer in tokens.", min=1)
    max_model_len: int = opt(1024, "Context length of a separate generator engine (source=vllm).", min=16)

    def check(self, rollout: RolloutConfig) -> None:
        """Rules that span fields; run when generation is enabled."""
        if self.min_words > self.max_words:
            raise ConfigError(f"generation.min_words = {self.min_words} must not exceed generation.max_words = {self.max_words}")
        if not self.generators:
            raise ConfigError("generation.generators = []: give at least one generator, e.g. [{source: policy}]")
        needs = {"vllm": ("model_path",), "openai": ("base_url", "api_model")}
        for index, spec in enumerate(self.generators):
            key = f"generation.generators[{index}]"
            for name in needs.get(spec.source, ()):
                if not getattr(spec, name):
                    raise ConfigError(f"{key}.{name} = None: source={spec.source} needs {' and '.join(needs[spec.source])}")
            context = {"policy": ("rollout.max_model_len", rollout.max_model_len),
                       "vllm": ("generation.max_model_len", self.max_model_len)}.get(spec.source)
            if context and self.max_new_tokens >= context[1]:
                raise ConfigError(f"generation.max_new_tokens = {self.max_new_tokens} leaves no room for the request in "
                                  f"{context[0]} = {context[1]} ({key}.source={spec.source}); lower it or raise {context[0]}")


@dataclass
class EvalConfig:
    """`dynalign eval`: value alignment against a baseline, and general abilities (lm-eval)."""

    prompts_path: str = opt("configs/eval/value_prompts.jsonl", "Held-out value prompts (JSONL or Parquet) that the policy and the baseline both answer.")
    prompt_key: str = opt("prompt", "Column of eval.prompts_path that holds the prompt text.")
    pillar_key: str = opt("pillar", "Column that names each eval prompt's pillar (per-pillar rates; absent: overall only).")
    id_key: str = opt("id", "Column that holds a stable eval prompt id (row index is used when absent).")
    max_prompts: int = opt(0, "Evaluate at most this many held-out prompts, in file order (0: all).", min=0)
    holdout_threshold: float = opt(0.7, "Drop an eval prompt whose ROUGE-L F against any training prompt of the run reaches this (held out = below it).", min=0.0, max=1.0, min_exclusive=True)
    judge: Literal["self", "model", "openai"] = opt("self", "Who compares the answers: self (the policy judges), model (eval.judge_model_path in a vLLM engine), openai (an OpenAI-compatible endpoint).")
    judge_model_path: str | None = opt(None, "judge=model: the judge's model directory (Hugging Face format).")
    judge_base_url: str | None = opt(None, "judge=openai: endpoint base URL, e.g. http://127.0.0.1:8000/v1.")
    judge_api_model: str | None = opt(None, "judge=openai: model name sent with each request.")
    judge_api_key_env: str | None = opt(None, "judge=openai: environment variable holding the API key (None: no key).")
    judge_mode: Literal["logprob", "generate"] = opt("logprob", "logprob: preference = P('1') / (P('1') + P('2')) of the judge's next token after 'Winner:'; generate: the judge writes 'Winner: 1|2|tie' (openai judges always generate).")
    tie_band: float = opt(0.05, "A pair is a tie when the judge's preference for the policy, averaged over both orders, is within this of 0.5.", min=0.0, max=0.5)
    rubric: bool = opt(True, "Also score every answer alone on the value's rubric (judge.value_spec, judge.score_min..score_max): mean rubric score per model.")
    max_new_tokens: int = opt(128, "Longest answer in tokens.", min=1)
    temperature: float = opt(0.0, "Answer sampling temperature (0: greedy, so both runs of a comparison see the same answers).", min=0.0)
    judge_max_new_tokens: int = opt(96, "Longest judge reply in tokens (generate mode).", min=1)
    bootstrap_samples: int = opt(2000, "Bootstrap resamples of the prompts behind each interval.", min=100)
    confidence: float = opt(0.95, "Coverage of the bootstrap (percentile) intervals.", min=0.5, max=1.0, min_exclusive=True)
    seed: int = opt(0, "Seed of answer sampling and of the bootstrap (numpy).")
    tasks: list = opt([], "lm-evaluation-harness tasks run on the policy (and the baseline), e.g. [ifeval, gsm8k, mmlu] or the local dynalign_exact; [] skips them.")
    harness_backend: Literal["vllm", "hf"] = opt("vllm", "lm-eval model type: vllm (also on CPU with vllm-cpu) or hf (transformers; needs accelerate).")
    harness_include_path: str = opt("configs/eval/tasks", "Directory of local lm-eval task YAMLs; relative data_files in them are resolved against the YAML's folder.")
    harness_limit: int = opt(0, "Examples per lm-eval task (0: all).", min=0)
    harness_num_fewshot: int | None = opt(None, "Few-shot examples per lm-eval task (None: each task's default).", min=0)
    harness_apply_chat_template: bool = opt(False, "Wrap lm-eval prompts in the model's chat template.")
    harness_batch_size: int = opt(0, "lm-eval batch size (0: auto).", min=0)
    harness_timeout_s: float = opt(7200.0, "An lm-eval run (one model, all tasks) that takes longer is stopped with an error.", min=0.0, min_exclusive=True)


@dataclass
class TrainConfig:
    run_dir: str = opt("outputs/run", "Where metrics, checkpoints and the final policy go.")
    iterations: int = opt(2, "Dynamic Alignment iterations (generate -> judge -> learn -> sync).", min=1)
    seed: int = opt(0, "Global seed: prompt order, sampling and learner init derive from it.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def engine_dtype(self) -> str:
        """``model.dtype``, ``auto`` decided on the driver: bf16 on GPUs and on CPUs with native bf16."""
        if self.model.dtype != "auto":
            return self.model.dtype
        on_gpu = self.rollout.num_gpus_per_worker > 0 or self.judge.num_gpus_per_worker > 0
        return "bfloat16" if on_gpu or cpu_has_native_bf16() else "float32"

    @property
    def learner_dtype(self) -> str:
        """``model.learner_dtype``, ``auto`` decided where the learner runs: bf16 mixed precision on
        GPUs and on CPUs that multiply bf16 in hardware, where it is several times faster than
        float32 (docs/performance.md, section 3b); float32 elsewhere, where bf16 is emulated."""
        if self.model.learner_dtype != "auto":
            return self.model.learner_dtype
        return "bfloat16" if self.learner.num_gpus_per_rank > 0 or cpu_has_bf16_matmul() else "float32"

    def check(self) -> None:
        """Rules that span fields."""
        if self.judge.score_min >= self.judge.score_max:
            raise ConfigError(f"judge.score_min = {self.judge.score_min} must be below judge.score_max = {self.judge.score_max}")
        self.judge.check()
        self.learner.check()
        self.logging.check()
        needed = self.data.max_prompt_tokens + self.rollout.max_new_tokens
        if self.rollout.max_model_len < needed:
            raise ConfigError(
                f"rollout.max_model_len = {self.rollout.max_model_len}: a prompt of data.max_prompt_tokens = "
                f"{self.data.max_prompt_tokens} plus an answer of rollout.max_new_tokens = {self.rollout.max_new_tokens} "
                f"needs {needed}; raise rollout.max_model_len or lower one of the two")
        samples = self.data.prompts_per_iteration * self.rollout.group_size
        per_update = self.learner.num_ranks * self.learner.micro_batch_size * self.learner.updates_per_iteration
        if samples % per_update:
            raise ConfigError(
                f"data.prompts_per_iteration * rollout.group_size = {samples} must be a multiple of "
                f"learner.num_ranks * learner.micro_batch_size * learner.updates_per_iteration = {per_update}; "
                "change one of them")
        if self.learner.lora.enabled and self.sync.backend == "nccl":
            raise ConfigError(f"sync.backend = nccl with learner.lora.rank = {self.learner.lora.rank}: the NCCL transfer "
                              "moves full weights, a LoRA run moves only its adapter (through the object store); "
                              "use sync.backend=auto or reload")
        if self.generation.enabled:
            self.generation.check(self.rollout)
        check_resource_shapes(self)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (oneDNN: AVX-512 or Arm BF16), as vLLM-cpu needs."""
    import torch
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX or AVX512-BF16): there a bf16 training step
    beats float32; AVX-512 alone runs bf16 through conversions, no faster than float32."""
    import torch
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, so looked up defensively
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def check_resource_shapes(config: TrainConfig) -> None:
    """Config-time rules (no cluster needed): amounts Ray and vLLM accept."""
    amounts = [("rollout.num_gpus_per_worker", config.rollout.num_gpus_per_worker),
               ("judge.num_gpus_per_worker", config.judge.num_gpus_per_worker),
               ("learner.num_gpus_per_rank", config.learner.num_gpus_per_rank)]
    for key, value in ((key, value) for key, value in amounts if value > 1 and value != int(value)):
        raise ConfigError(f"{key} = {value:g} (from the config): Ray accepts a fraction below 1 or a whole "
                          "number of GPUs; use e.g. 0.5, 1 or 2")
    for key, extra in (("rollout.resources", config.rollout.resources), ("judge.resources", config.judge.resources),
                       ("learner.resources_per_rank", config.learner.resources_per_rank)):
        for name, value in extra.items():
            if name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ConfigError(f"{key}.{name} (from the config): set CPUs and GPUs with the num_cpus_*/num_gpus_* "
                                  "options; this mapping is for custom resources only")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{key}.{name} = {value!r} (from the config) must be a number >= 0")
    if config.rollout.tensor_parallel_size > 1:
        for key, value in amounts[:2]:
            if value > 1:
                raise ConfigError(f"{key} = {value:g} with rollout.tensor_parallel_size = "
                                  f"{config.rollout.tensor_parallel_size} (from the config): GPUs are per "
                                  "tensor-parallel rank, at most 1 each (an engine takes tensor_parallel_size of them)")
    if config.rollout.sleep_while_learning and config.rollout.max_staleness > 0:
        raise ConfigError(f"rollout.max_staleness = {config.rollout.max_staleness} (from the config) generates while the "
                          "learner steps, but rollout.sleep_while_learning puts the engines to sleep then; set "
                          "rollout.max_staleness=0 or rollout.sleep_while_learning=false")
    if config.rollout.sleep_while_learning and config.rollout.num_gpus_per_worker == 0:
        raise ConfigError("rollout.sleep_while_learning = true (from the config) needs GPU engines (vLLM sleep mode "
                          "is GPU-only); set rollout.num_gpus_per_worker > 0 or turn it off")


# ---------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------

def api_key_from_env(field: str, env_name: str | None) -> str | None:
    """The API key held by environment variable ``env_name`` (the option ``field`` names it), or
    None when no variable is configured; a configured but unset variable is a one-line error."""
    if not env_name:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise ConfigError(f"{field} = '{env_name}': that environment variable is not set; "
                          f"export it, or set {field} to null for an endpoint without keys")
    return key


def load_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's contents; a syntax error is one line with the file, line, column and problem."""
    import yaml

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path} line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = " ".join(str(err.problem or err.context or "not valid YAML").split())
        problem = re.sub(r"^found duplicate key (\S+)$", r"found duplicate key '\1'", problem)
        lines = Path(path).read_text(errors="replace").splitlines()
        if mark and mark.line < len(lines) and lines[mark.line][mark.column:mark.column + 1] == "\t":
            problem += " (a tab: indent with spaces)"
        raise ConfigError(f"{what} {where}: {problem}") from None
    except Exception as err:  # omegaconf's own errors are multi-line
        raise ConfigError(f"{what} {path}: not valid YAML ({' '.join(str(err).split())[:200]})") from None


def writable_dir(option: str, path: str | Path) -> Path:
    """Create directory ``path`` (named by ``option`` in the error) or refuse it in one line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".dynalign-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        if isinstance(err, (FileExistsError, NotADirectoryError)) or (path.exists() and not path.is_dir()):
            reason = "a file is in the way, a directory is needed"
        raise ConfigError(f"{option} = '{path}': cannot write there: {reason}; choose a writable directory") from None
    return path


def load_config(yaml_path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """Defaults, then the YAML file, then ``key=value`` overrides; validated at each step."""
    config = TrainConfig()
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"--config {yaml_path}: no such file")
        yaml_values = load_yaml(path, "--config")
        if yaml_values is None:
            yaml_values = {}
        if not isinstance(yaml_values, dict):
            raise ConfigError(f"--config {yaml_path}: expected a mapping of options at the top level")
        apply_values(config, yaml_values, source=str(yaml_path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' (command line): expected key=value, e.g. learner.lr=1e-5")
        apply_values(config, OmegaConf.to_container(OmegaConf.from_dotlist([item])), source="command line")
    config.check()
    return config


def apply_values(config: Any, values: dict, source: str, prefix: str = "") -> None:
    """Set ``values`` (a nested dict) on the dataclass ``config``, validating each leaf."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    hints = typing.get_type_hints(type(config))
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields and key in getattr(config, "aliases", {}):
            hint, apply = config.aliases[key]
            apply(config, _coerce(dotted, value, hint, {}, source))
            continue
        if key not in fields:
            close = _closest(str(key), fields)
            hint = f"; did you mean '{prefix}{close}'?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key '{dotted}' (from {source}){hint}")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted} = {value!r} (from {source}) must be a mapping of options of section '{dotted}'")
            apply_values(current, value, source, prefix=f"{dotted}.")
            continue
        setattr(config, key, _coerce(dotted, value, hints[key], fields[key].metadata, source))


def _coerce(key: str, value: Any, hint: Any, meta: typing.Mapping, source: str) -> Any:
    where = f"{key} = {value!r} (from {source})"
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {', '.join(map(str, args))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number")
        value = float(value)
        if not math.isfinite(value):  # NaN passes every range check; inf trains a model to NaN
            raise ConfigError(f"{where} must be a finite number")
    elif hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a string")
        value = str(value)
    elif origin is list and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise ConfigError(f"{where} must be a list of mappings of options of {args[0].__name__}")
        items = []
        for index, item in enumerate(value):
            items.append(args[0]())
            apply_values(items[-1], item, source, prefix=f"{key}[{index}].")
        return items
    elif origin is list and args and typing.get_origin(args[0]) is Literal:
        allowed = typing.get_args(args[0])
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list of {', '.join(allowed)}, e.g. [{allowed[0]}]")
        for item in value:
            if item not in allowed:
                raise ConfigError(f"{where}: {item!r} is not one of {', '.join(allowed)}")
        return list(value)
    elif hint in (list, dict) or origin in (list, dict):
        if not isinstance(value, origin or hint):
            raise ConfigError(f"{where} must be a {(origin or hint).__name__}")
    low, high = meta.get("min"), meta.get("max")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        too_low = low is not None and (value <= low if meta.get("min_exclusive") else value < low)
        too_high = high is not None and value > high
        if too_low or too_high:
            raise ConfigError(f"{where} is out of range; allowed: {_range_text(meta)}")
    return value


def _range_text(meta: typing.Mapping) -> str:
    low, high = meta.get("min"), meta.get("max")
    parts = []
    if low is not None:
        parts.append(f"{'>' if meta.get('min_exclusive') else '>='} {low:g}")
    if high is not None:
        parts.append(f"<= {high:g}")
    return " and ".join(parts)


def _closest(key: str, candidates: typing.Iterable[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(config)))


def describe(config_cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, default, doc) for every option: the reference table in the docs comes from this."""
    rows = []
    for f in dataclasses.fields(config_cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            rows.extend(describe(type(default), f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", default, f.metadata.get("doc", "")))
    return rows
