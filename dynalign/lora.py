"""LoRA on the learner (``learner.lora.rank > 0``): a PEFT adapter on the DeepSpeed ranks.

Only the adapter trains, so only the adapter moves to the engines (``adapter_entries``: PEFT's
own tensor names, what vLLM's ``LoRAModel.from_lora_tensors`` reads). The policy is saved both
ways: the adapter in PEFT format (``write_adapter``) and the base weights with the adapter merged
in, in Hugging Face format (``merged_entries``), which transformers and vLLM load like any model.

An entry is ``(name, parameter, merge)``: ``merge`` is None, or the ``(lora_A, lora_B, scaling)``
whose product is added to the parameter (``entry_value``). Under ZeRO-3 the caller gathers the
parameter and both factors together.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dynalign.learner_config import LoraConfig

ADAPTER = "default"  # PEFT's name for the one adapter a model gets from get_peft_model
PEFT_PREFIX = "base_model.model."  # what PEFT puts before the wrapped model's parameter names


def peft_config(lora: LoraConfig, base_model_path: str | None = None):
    """PEFT's LoraConfig for ``learner.lora``."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM",
                          base_model_name_or_path=base_model_path)


def engine_peft_config(lora: LoraConfig) -> dict:
    """The fields of ``adapter_config.json`` vLLM's ``PEFTHelper`` reads, sent with each adapter."""
    return {"r": lora.rank, "lora_alpha": lora.alpha, "target_modules": sorted(lora.target_modules), "bias": "none"}


def wrap(model, lora: LoraConfig, gradient_checkpointing: bool = False):
    """``model`` with an adapter on ``lora.target_modules``; only the adapter trains. LoRA's B starts at
    zero, so the wrapped model computes exactly what the base model does until the first update."""
    from peft import get_peft_model

    if gradient_checkpointing:  # frozen embeddings: checkpointed blocks need an input that wants a gradient
        model.enable_input_require_grads()
    wrapped = get_peft_model(model, peft_config(lora))
    missing = [t for t in lora.target_modules
               if not any(name.endswith(f".{t}") for name, _ in model.named_modules())]
    if missing:  # PEFT refuses only when no target matches at all
        from dynalign.config import ConfigError
        raise ConfigError(f"learner.lora.target_modules = {list(lora.target_modules)!r}: the model has no layer "
                          f"named {', '.join(missing)}; drop it from the list")
    return wrapped


def base_model(module):
    """The transformers model under a PEFT wrapper (``module`` itself without one)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def entries(module, with_lora: bool, adapter: bool = False) -> list[tuple]:
    """What leaves the learner: every parameter (full fine-tuning); with LoRA the adapter alone
    (``adapter``) or the base weights with the adapter merged in."""
    if not with_lora:
        return [(name, param, None) for name, param in module.named_parameters()]
    return adapter_entries(module) if adapter else merged_entries(module)


def adapter_entries(module) -> list[tuple[str, torch.nn.Parameter, None]]:
    """The adapter's parameters under PEFT's saved names (the adapter's name dropped)."""
    return [(name.replace(f".{ADAPTER}.", "."), param, None)
            for name, param in module.named_parameters() if ".lora_" in name]


def merged_entries(module) -> list[tuple[str, torch.nn.Parameter, tuple | None]]:
    """The base model's parameters under their Hugging Face names; a weight that carries an adapter
    comes with the factors to merge into it."""
    entries = []
    for name, param in module.named_parameters():
        if ".lora_" in name:
            continue
        merge = None
        if name.endswith(".base_layer.weight"):
            layer = module.get_submodule(name.removesuffix(".base_layer.weight"))
            merge = (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, float(layer.scaling[ADAPTER]))
        entries.append((name.removeprefix(PEFT_PREFIX).replace(".base_layer.", "."), param, merge))
    return entries


def entry_params(entry) -> list[torch.nn.Parameter]:
    _, param, merge = entry
    return [param] if merge is None else [param, merge[0], merge[1]]


def entry_value(entry) -> torch.Tensor:
    """The entry's tensor (gathered, under ZeRO-3): W, or W + scaling * B @ A in float32."""
    _, param, merge = entry
    if merge is None:
        return param.detach()
    lora_a, lora_b, scaling = merge
    return param.detach().float() + scaling * (lora_b.detach().float() @ lora_a.detach().float())


def merge_adapter(adapter: str | os.PathLike, out: str | os.PathLike, base: str | None = None,
                  dtype_name: str = "auto") -> Path:
    """``dynalign export --merge``: the adapter at ``adapter`` merged into its base (``base``, or the
    one its adapter_config.json names), in Hugging Face format at ``out`` (replaced atomically)."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dynalign.checkpoint import policy_dtype
    from dynalign.config import ConfigError
    from dynalign.files import atomic_directory

    config_file = Path(adapter) / "adapter_config.json"
    if not config_file.is_file():
        raise ConfigError(f"export ADAPTER = '{adapter}': no adapter_config.json there; give a LoRA run's adapter "
                          "directory, e.g. RUN/adapter")
    base = base or json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise ConfigError(f"export --base = {base!r}: not a model directory; give the base model with --base")
    dtype = policy_dtype(dtype_name, base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter))
    merged = model.merge_and_unload().to(getattr(torch, dtype))  # merged in float32, then cast once
    with atomic_directory(out) as staging:
        merged.save_pretrained(staging)
        AutoTokenizer.from_pretrained(base).save_pretrained(staging)
    return Path(out)


def write_adapter(path: str | os.PathLike, tensors: dict[str, torch.Tensor], lora: LoraConfig, base_model_path: str) -> None:
    """The adapter in PEFT format (``adapter_model.safetensors``, ``adapter_config.json``): what
    ``PeftModel.from_pretrained(base, path)`` and vLLM's ``LoRARequest(lora_path=path)`` load.
    The directory replaces ``path`` atomically."""
    from safetensors.torch import save_file

    from dynalign.files import atomic_directory

    with atomic_directory(path) as staging:
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(Path(staging) / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        peft_config(lora, base_model_path).save_pretrained(str(staging))
