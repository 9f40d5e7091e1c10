"""`dynalign plan`: the memory each role of a config needs, per device, and whether it fits.

Pure arithmetic, no Ray, GPU or vLLM: parameters are counted on PyTorch's meta device from the
model's config.json (a hub id that is no local directory: configs/architectures/). Roles go on
devices in placement.py's order (rollout, judge, generator engines, then learner ranks; fractional
GPUs share one, first fit). Every formula is here with its reason; docs/cluster.md shows the output.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

from dynalign.config import ConfigError, TrainConfig

GIB = 2**30
ARCHITECTURES = Path(__file__).resolve().parents[1] / "configs" / "architectures"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DEFAULT_GPU_GIB = 80.0
# A vLLM engine's memory besides weights and KV cache, per GPU: the profile run's activation peak and
# non-torch allocations (~2 GiB, docs/cluster.md), plus ~1 GiB of CUDA graphs unless enforce_eager.
ENGINE_ACTIVATIONS_GPU = 2 * GIB
CUDA_GRAPHS = 1 * GIB
# A CPU engine: the model runner's activations and buffers beside VLLM_CPU_KVCACHE_SPACE.
ENGINE_ACTIVATIONS_CPU = 1 * GIB
# What a process keeps on a GPU it uses: CUDA context, cuBLAS/NCCL workspaces; a sleeping vLLM
# engine (sleep mode level 1: weights to host, KV cache freed) keeps about this much too.
CUDA_CONTEXT = GIB // 2


@dataclass(frozen=True)
class Architecture:
    source: str  # the config.json read
    params: int
    embedding_params: int  # input embedding (the LM head is as large; shared when tied)
    tied: bool
    largest_unit: int  # parameters of the largest module ZeRO-3 gathers at once (a layer, the embedding)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    counted: str  # "meta device" or why an analytic count was used

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of every layer: 2 x layers x KV heads x head_dim x bytes (all layers count as
        full attention: sliding-window layers need less in practice)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def config_dir(path: str) -> Path:
    """Where ``path``'s config.json is: a local directory wins, then configs/architectures/ by hub
    id, then by the path's last component (outputs/models/smollm2-135m-instruct)."""
    local = Path(path)
    if (local / "config.json").is_file():
        return local
    shipped = ARCHITECTURES / path.strip("/").replace("/", "--")
    if (shipped / "config.json").is_file():
        return shipped
    for candidate in sorted(ARCHITECTURES.glob("*/config.json")):
        if candidate.parent.name.split("--")[-1].lower() == local.name.lower():
            return candidate.parent
    raise ConfigError(f"model.path = '{path}': no config.json there and no architecture file for it; point "
                      f"model.path at a model directory or add configs/architectures/"
                      f"{path.strip('/').replace('/', '--')}/config.json (configs/architectures/README.md)")


@functools.cache
def architecture(path: str, trust_remote_code: bool = False) -> Architecture:
    """Count ``path``'s parameters exactly on the meta device, or analytically if transformers cannot build it."""
    from transformers import AutoConfig

    directory = config_dir(path)
    cfg = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    text = cfg.get_text_config()
    hidden, layers, heads = text.hidden_size, text.num_hidden_layers, text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    tied = bool(getattr(text, "tie_word_embeddings", False))
    shape = dict(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                 vocab=text.vocab_size, tied=tied, source=_shown(directory / "config.json"))
    try:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
        blocks = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
        embedding = model.get_input_embeddings().weight.numel()
        largest = max([embedding, *(sum(p.numel() for p in block.parameters()) for block in blocks)])
        return Architecture(params=sum(p.numel() for p in model.parameters()), embedding_params=embedding,
                            largest_unit=largest, counted="meta device", **shape)
    except Exception as error:  # an architecture this transformers cannot build: count the usual shapes
        experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None) or 1
        attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim  # q, o; k, v
        layer = attention + 3 * hidden * text.intermediate_size * experts + 2 * hidden  # gated MLP, 2 norms
        embedding = text.vocab_size * hidden
        reason = " ".join(str(error).split())[:120]
        return Architecture(params=layers * layer + embedding * (1 if tied else 2) + hidden, embedding_params=embedding,
                            largest_unit=max(layer, embedding), counted=f"analytic count ({reason})", **shape)


def _shown(path: Path) -> str:
    resolved = path.resolve()
    return str(resolved.relative_to(Path.cwd())) if resolved.is_relative_to(Path.cwd()) else str(path)


def model_of(config: TrainConfig, path: str | None = None) -> Architecture:
    return architecture(path or config.model.path, config.model.trust_remote_code)


def zero_stage_for(configured: int, world_size: int) -> int:
    """ZeRO-1/2 on one rank partition nothing yet still copy every gradient through their buckets
    (1.24x the step time of stage 0 for SmolLM2 on CPU): one rank runs stage 0, the same updates."""
    return 0 if world_size == 1 and configured in (1, 2) else configured


def zero_optimization(stage: int, hidden: int) -> dict:
    """DeepSpeed's ``zero_optimization`` section for the learner. ZeRO-2/3's gradient buckets are
    sized from the model's hidden size, as transformers' "auto" values size them, and so are
    ZeRO-3's cap on gathered parameters and its optimizer sub-groups (DeepSpeed's defaults, 5e8-1e9
    elements, held a 135M model's whole gradient in a bucket and kept it gathered on CPU: ZeRO-3
    used more memory per rank than ZeRO-0). ZeRO-1 keeps DeepSpeed's defaults (the CPU demo's
    learner, whose speed was measured with them)."""
    if stage < 2:
        return {"stage": stage}
    if stage == 2:
        return {"stage": 2, "reduce_bucket_size": hidden * hidden, "allgather_bucket_size": hidden * hidden}
    return {"stage": 3, "reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden, "stage3_max_live_parameters": 10 * hidden * hidden,
            "stage3_max_reuse_distance": 10 * hidden * hidden, "sub_group_size": 10 * hidden * hidden}


def learner_rank_memory(config: TrainConfig, world_size: int | None = None, zero_stage: int | None = None,
                        beta: float | None = None) -> dict[str, int]:
    """Bytes one learner rank holds at its peak (the backward pass of a micro-batch), by part.

    ZeRO (Rajbhandari et al. 2020) with AdamW, P parameters over N ranks. fp32 training: weights 4P,
    gradients 4P, Adam moments 8P. bf16 mixed precision: weights 2P, gradients 2P, and the optimizer
    holds the fp32 master copy 4P beside the moments 8P. ZeRO-1 partitions the optimizer state
    (/N), ZeRO-2 the gradients too, ZeRO-3 the weights too. The reference model (beta > 0) is one
    frozen copy in the learner dtype, partitioned only under ZeRO-3. Activations: see
    ``learner_activations``; under ZeRO-3 they include the buffers of gathered parameters.
    """
    learner = config.learner
    return _rank_memory(config, world_size or learner.num_ranks,
                        learner.zero_stage if zero_stage is None else zero_stage, learner.beta if beta is None else beta)


def lora_params(config: TrainConfig) -> int:
    """Parameters of the ``learner.lora`` adapter (0 without LoRA): rank x (fan-in + fan-out) of each
    targeted linear layer of each decoder layer (MLP sizes from the config's intermediate_size)."""
    lora = config.learner.lora
    if not lora.enabled:
        return 0
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(config_dir(config.model.path),
                                      trust_remote_code=config.model.trust_remote_code).get_text_config()
    arch = model_of(config)
    inner = getattr(text, "intermediate_size", None) or 4 * arch.hidden
    q, kv, h = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.hidden
    sizes = {"q_proj": h + q, "k_proj": h + kv, "v_proj": h + kv, "o_proj": q + h,
             "gate_proj": h + inner, "up_proj": h + inner, "down_proj": inner + h}
    return arch.layers * lora.rank * sum(sizes[name] for name in lora.target_modules)


def _rank_memory(config: TrainConfig, ranks: int, stage: int, beta: float, checkpointing: bool | None = None,
                 micro_batch: int | None = None) -> dict[str, int]:
    stage = zero_stage_for(stage, ranks)
    arch, width = model_of(config), DTYPE_BYTES[config.learner_dtype]
    # DeepSpeed's ZeRO optimizers keep an fp32 partition of the weights even for fp32 training
    # (stage_1_and_2.py: single_partition_of_fp32_groups; stage3.py: fp32_partitioned_groups_flat).
    p, master = arch.params, 4 if config.learner_dtype != "float32" or stage >= 1 else 0
    # With LoRA only the adapter has gradients and optimizer state; the base weights stay, frozen.
    adapter = lora_params(config)
    trained = adapter or p
    memory = {"weights": (p + adapter) * width // (ranks if stage >= 3 else 1),
              "gradients": trained * width // (ranks if stage >= 2 else 1),
              "optimizer": trained * (master + 8) // (ranks if stage >= 1 else 1),
              "reference": p * width // (ranks if stage >= 3 else 1) if beta > 0 else 0,
              "activations": learner_activations(config, arch, checkpointing, micro_batch)}
    # torch's AdamW steps a tensor through two temporaries its size (sqrt, then the bias-corrected
    # denominator): under ZeRO-1/2 the rank's whole flat fp32 partition, under ZeRO-0 one
    # parameter at a time (the largest, the embedding), under ZeRO-3 one sub-group (below).
    if stage in (1, 2):
        memory["activations"] += 2 * 4 * p // ranks
    elif stage == 0:
        memory["activations"] += 2 * 4 * arch.embedding_params
    if stage >= 3:
        zero = zero_optimization(3, arch.hidden)
        # Parameters gathered for compute: up to stage3_max_live_parameters kept, plus the module
        # being fetched (at least the largest one); and AdamW's temporaries on one optimizer
        # sub-group of the fp32 partition (about two sub-group-sized fp32 tensors).
        live = min(zero["stage3_max_live_parameters"], p) + arch.largest_unit
        memory["activations"] += live * width + 2 * 4 * min(zero["sub_group_size"], p // ranks)
    memory["total"] = sum(memory.values())
    return memory


def learner_activations(config: TrainConfig, arch: Architecture, checkpointing: bool | None = None,
                        micro_batch: int | None = None) -> int:
    """Activation bytes of one micro-batch of ``learner.micro_batch_size`` sequences of
    data.max_prompt_tokens + rollout.max_new_tokens tokens.

    - Logits of the answer positions only (the learner passes logits_to_keep), in fp32 for the
      log-softmax: about 3 copies live (logits, log-probs, their gradient).
    - Per layer, Korthikanti et al. 2022 ("Reducing Activation Recomputation", eq. 1): 34 s b h + 5 a
      s^2 b bytes for 16-bit activations (scaled by bytes / 2 for fp32). With gradient checkpointing
      each layer keeps only its input (s b h values) and one layer at a time is recomputed.
    """
    checkpointing = config.learner.gradient_checkpointing if checkpointing is None else checkpointing
    b, answer = micro_batch or config.learner.micro_batch_size, config.rollout.max_new_tokens
    s, width = config.data.max_prompt_tokens + answer, DTYPE_BYTES[config.learner_dtype]
    logits = 3 * b * answer * arch.vocab * 4
    layer = (34 * s * b * arch.hidden + 5 * arch.heads * s * s * b) * width // 2
    layers = arch.layers * s * b * arch.hidden * width + layer if checkpointing else arch.layers * layer
    return logits + layers


@dataclass
class EngineRole:
    role: str  # rollout, judge, generator
    model: str
    max_model_len: int
    units: int
    gpus: float  # per tensor-parallel rank
    step_sequences: int  # sequences one step sends to each engine
    step_length: int  # tokens each of them takes at most


def engine_roles(config: TrainConfig) -> list[EngineRole]:
    """The engines a run starts, in start order (dynalign/engine.py EngineSpec, placement.role_requests)."""
    rollout, judge, data = config.rollout, config.judge, config.data
    groups = data.prompts_per_iteration * rollout.group_size
    shared = judge.max_model_len if judge.uses_shared_engines else 0  # shared engines read judge prompts too
    length, step = max(rollout.max_model_len, shared), max(data.max_prompt_tokens + rollout.max_new_tokens, shared)
    roles = [EngineRole("rollout", config.model.path, length, rollout.num_workers, rollout.num_gpus_per_worker,
                        -(-groups // rollout.num_workers), step)]
    if judge.actor_count:
        model = judge.model_path if judge.kind == "external_vllm" else config.model.path
        roles.append(EngineRole("judge", model, judge.max_model_len, judge.num_workers, judge.num_gpus_per_worker,
                                -(-groups // judge.num_workers), judge.max_model_len))
    gen = config.generation
    return roles + [EngineRole("generator", spec.model_path, gen.max_model_len, 1, rollout.num_gpus_per_worker,
                               gen.requests_per_iteration, gen.max_model_len)
                    for spec in gen.generators if gen.enabled and spec.source == "vllm"]


def engine_memory(config: TrainConfig, role: str | EngineRole, gpu_memory_gib: float | None = None) -> dict[str, int]:
    """Bytes per tensor-parallel rank of one ``role`` engine (rollout, judge, generator), and the KV
    tokens they buy against what a step needs.

    GPU: vLLM takes gpu_memory_utilization x the GPU's memory and splits it into weights (P x engine
    dtype / tp), activations and CUDA graphs, and the KV cache (the rest). CPU: weights, the runtime,
    and rollout.cpu_kv_cache_gib of KV cache. vLLM refuses to start with KV room for less than one
    max_model_len sequence.
    """
    spec = role if isinstance(role, EngineRole) else next(r for r in engine_roles(config) if r.role == role)
    arch, width, tp = model_of(config, spec.model), DTYPE_BYTES[config.engine_dtype], config.rollout.tensor_parallel_size
    weights, per_token = arch.params * width // tp, arch.kv_bytes_per_token(width) // tp
    if spec.gpus > 0:
        activations = ENGINE_ACTIVATIONS_GPU + (0 if config.rollout.enforce_eager else CUDA_GRAPHS)
        total = int(config.rollout.gpu_memory_utilization * (gpu_memory_gib or DEFAULT_GPU_GIB) * GIB)
        kv = total - weights - activations
    else:
        activations, kv = ENGINE_ACTIVATIONS_CPU, config.rollout.cpu_kv_cache_gib * GIB
        total = weights + activations + kv
    return {"weights": weights, "activations": activations, "kv_cache": kv, "total": total,
            "kv_tokens": max(kv, 0) // per_token, "min_tokens": spec.max_model_len, "kv_needed": spec.max_model_len * per_token,
            "step_tokens": spec.step_sequences * spec.step_length}


PARTS = ("weights", "gradients", "optimizer", "reference", "activations", "kv_cache")


@dataclass
class Row:
    role: str  # "rollout engine", "judge engine", "generator engine", "learner rank"
    devices: list[int]  # GPU indices; [] for host memory
    parts: dict[str, int]
    total: int
    budget: int
    fix: str
    note: str = ""
    starts: bool = True  # an engine: KV room for one max_model_len sequence
    units: int = 1
    engine: bool = False
    kv_needed: int = 0  # an engine: KV bytes of one max_model_len sequence

    @property
    def fits(self) -> bool:
        return self.starts and self.total <= self.budget

    @property
    def name(self) -> str:
        return f"{self.role} x{self.units}" if self.units > 1 else self.role

    @property
    def device(self) -> str:
        if not self.devices:
            return "host"
        low, high = min(self.devices), max(self.devices)
        return f"GPU {low}" if low == high else f"GPU {low}-{high}"


@dataclass
class Plan:
    model: Architecture
    rows: list[Row]
    gpu_memory: int | None
    host_memory: int | None  # None: host memory not checked (GPU configs without --host-memory-gib)
    host_needed: int  # GPU configs: host memory for staging (fp32 loads, weights during syncs)
    host_detail: str = ""

    @property
    def refusal(self) -> str | None:
        for row in self.rows:
            if not row.fits:
                what = ", ".join(f"{k.replace('_', ' ')} {gib(v)}" for k, v in row.parts.items() if v > 0)
                on = "host memory" if not row.devices else row.device
                why = f"; {row.note}" if not row.starts else ""
                return f"{row.role} on {on} needs {gib(row.total)} GiB ({what}{why}) of {gib(row.budget)} GiB; {row.fix}"
        if self.host_memory is not None and self.host_needed > self.host_memory:
            return (f"GPU roles need {gib(self.host_needed)} GiB of host memory ({self.host_detail}) of "
                    f"{gib(self.host_memory)} GiB; use nodes with more memory")
        return None

    def check(self) -> None:  # a one-line ConfigError when the config cannot fit
        if self.refusal:
            raise ConfigError(self.refusal)


def gib(value: float | None) -> str:
    return f"{(value or 0) / GIB:.2f}"


def place(shares: list[float], free: list[float]) -> list[int]:
    """GPU indices for the bundles of one unit, first fit (a share > 1 takes whole GPUs)."""
    taken: list[int] = []
    for share in shares:
        need = min(share, 1.0)
        for _ in range(max(1, int(share))):
            index = next((i for i, f in enumerate(free) if f + 1e-9 >= need and i not in taken), None)
            if index is None:
                free.append(1.0)
                index = len(free) - 1
            free[index] -= need
            taken.append(index)
    return taken


LENGTH_KEYS = {"rollout": "rollout.max_model_len", "judge": "judge.max_model_len", "generator": "generation.max_model_len"}
COUNT_KEYS = {"rollout": "rollout.num_workers", "judge": "judge.num_workers", "generator": "generation.generators"}


def plan(config: TrainConfig, gpu_memory_gib: float | None = None, host_memory_gib: float | None = None) -> Plan:
    """Every role's memory on its device(s), and a budget each: the device's memory less what the
    roles sharing it hold at that role's peak (engines: the others' steady state; the learner: what
    the engines keep while it steps, only CUDA context when they sleep)."""
    import psutil

    arch = model_of(config)
    roles = engine_roles(config)
    on_gpu = any(e.gpus > 0 for e in roles) or config.learner.num_gpus_per_rank > 0
    gpu = int((gpu_memory_gib or DEFAULT_GPU_GIB) * GIB) if on_gpu else None
    host = int(host_memory_gib * GIB) if host_memory_gib else psutil.virtual_memory().total
    rollout, learner = config.rollout, config.learner
    free: list[float] = []
    units: list[Row] = []
    for spec in roles:
        m = engine_memory(config, spec, gpu_memory_gib)
        starts = m["kv_tokens"] >= m["min_tokens"]
        note = (f"KV cache {m['kv_tokens'] / 1e6:.3f} M tokens per engine; a step needs up to {m['step_tokens'] / 1e6:.3f} M "
                f"({spec.step_sequences} sequences x {spec.step_length} tokens)" if starts else
                f"KV cache for {m['kv_tokens']} tokens, less than one {spec.max_model_len}-token sequence")
        fix = (f"raise rollout.gpu_memory_utilization = {rollout.gpu_memory_utilization:g} or rollout.tensor_parallel_size "
               f"= {rollout.tensor_parallel_size}, or lower {LENGTH_KEYS[spec.role]}" if spec.gpus > 0 else
               f"lower rollout.cpu_kv_cache_gib = {rollout.cpu_kv_cache_gib} or {COUNT_KEYS[spec.role]}")
        for _ in range(spec.units):
            gpus = place([spec.gpus] * rollout.tensor_parallel_size, free) if spec.gpus > 0 else []
            parts = {k: m[k] for k in ("weights", "activations", "kv_cache")}
            units.append(Row(f"{spec.role} engine", gpus, parts, 0, 0, fix, note, starts, engine=True,
                             kv_needed=m["kv_needed"]))
    rank = {k: v for k, v in learner_rank_memory(config).items() if k != "total"}
    for _ in range(learner.num_ranks):
        gpus = place([learner.num_gpus_per_rank], free)[:1] if learner.num_gpus_per_rank > 0 else []
        units.append(Row("learner rank", gpus, rank, 0, 0, ""))

    def held(unit: Row, while_learning: bool) -> int:
        """What ``unit`` holds on each of its devices while engines generate, or while the learner steps."""
        if not unit.devices:
            return sum(unit.parts.values())
        if unit.engine:
            asleep = while_learning and rollout.sleep_while_learning
            return CUDA_CONTEXT if asleep else int(rollout.gpu_memory_utilization * gpu)
        return sum(unit.parts.values()) - (0 if while_learning else unit.parts["activations"]) + CUDA_CONTEXT

    rows: list[Row] = []
    for unit in units:
        others = [u for u in units if u is not unit]
        if unit.devices:
            unit.budget = gpu - max(sum(held(u, not unit.engine) for u in others if d in u.devices) for d in unit.devices)
        else:
            unit.budget = host - sum(held(u, True) for u in others if not u.devices)
        unit.total = sum(unit.parts.values()) + (CUDA_CONTEXT if unit.devices and not unit.engine else 0)
        if unit.engine and unit.devices and not unit.starts:  # its own share: weights, activations, one sequence
            unit.budget, unit.total = unit.total, unit.total - unit.parts["kv_cache"] + unit.kv_needed
        if not unit.engine:
            sharing = any(u.engine and set(u.devices) & set(unit.devices) for u in others)
            unit.fix = learner_fix(config, unit.budget - (CUDA_CONTEXT if unit.devices else 0), sharing)
        last = rows[-1] if rows else None
        if last and (last.role, last.parts, last.budget, last.total) == (unit.role, unit.parts, unit.budget, unit.total):
            last.units += 1
            last.devices = sorted(set(last.devices + unit.devices))
        else:
            rows.append(replace(unit, devices=list(unit.devices)))
    detail, staging = "", 0
    if on_gpu:  # ZeRO-0/1/2 ranks load the model in fp32 before DeepSpeed takes it; engines stage bf16 weights
        engines = [u for u in units if u.engine and u.devices]
        # ZeRO-3 builds the model partitioned (deepspeed.zero.Init): the checkpoint files are only
        # memory-mapped, one at a time, in page cache the node's ranks share.
        zero3 = zero_stage_for(learner.zero_stage, learner.num_ranks) == 3
        load = 0 if zero3 or learner.num_gpus_per_rank == 0 else arch.params * 4
        per_engine = engines[0].parts["weights"] * rollout.tensor_parallel_size if engines else 0
        if config.learner.lora.enabled:  # only the adapter is staged, in the engines' dtype
            per_engine = lora_params(config) * DTYPE_BYTES[config.engine_dtype] if engines else 0
        staging = learner.num_ranks * load + len(engines) * per_engine
        loads = ("learner ranks built partitioned (ZeRO-3), no full load" if zero3
                 else f"{learner.num_ranks} learner ranks x {gib(load)} fp32 load, transient")
        detail = (f"{loads}, + {len(engines)} engines "
                  f"x {gib(per_engine)} {'adapter' if config.learner.lora.enabled else 'weights'} staged during a sync{' or asleep' if rollout.sleep_while_learning else ''}")
    checked = host_memory_gib is not None or not on_gpu
    return Plan(arch, rows, gpu, host if checked else None, staging, detail)


def learner_fix(config: TrainConfig, budget: int, shares_with_engines: bool) -> str:
    """The single changes that would each make a learner rank fit ``budget``, else all of them together."""
    learner = config.learner
    ranks, half = learner.num_ranks, max(1, learner.micro_batch_size // 2)
    options = [(name, change) for name, change, useful in (
        ("learner.zero_stage=3", {"stage": 3}, learner.zero_stage < 3 and ranks > 1),
        (f"learner.num_ranks={2 * ranks}", {"ranks": 2 * ranks}, True),
        ("learner.gradient_checkpointing=true", {"checkpointing": True}, not learner.gradient_checkpointing),
        (f"learner.micro_batch_size={half}", {"micro_batch": half}, learner.micro_batch_size > 1),
        ("learner.beta=0", {"beta": 0.0}, learner.beta > 0)) if useful]
    now = {"ranks": ranks, "stage": learner.zero_stage, "beta": learner.beta}
    fitting = [name for name, change in options if _rank_memory(config, **{**now, **change})["total"] <= budget]
    if shares_with_engines and not config.rollout.sleep_while_learning:
        fitting.append("rollout.sleep_while_learning=true")
    if fitting:
        return "set " + (", ".join(fitting[:-1]) + " or " if len(fitting) > 1 else "") + fitting[-1]
    return (f"set {' and '.join(name for name, _ in options)}, or use devices with more memory "
            "(--gpu-memory-gib / --host-memory-gib)")
