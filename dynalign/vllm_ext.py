"""Code that runs inside vLLM's worker processes (loaded by ``worker_extension_cls``).

The driver reaches these methods through ``LLM.collective_rpc``. Weights arrive as buckets of
raw tensor bytes (``dynalign.buckets``): on the CPU backend vLLM repacks linear weights after loading,
so a plain ``load_weights`` into the live model fails and the in-place ``reload_weights`` path
is required; it wants every weight in one call, so buckets are staged first, then applied.
"""

from __future__ import annotations

import torch

from dynalign.buckets import from_wire


class WeightSyncExtension:
    """Mixed into vLLM's Worker class; ``self`` is the worker."""

    def dynalign_stage_weights(self, bucket: list) -> int:
        """Keep one bucket (``dynalign.buckets.to_wire`` form) until ``apply`` loads them all."""
        staged = getattr(self, "_dynalign_staged", None)
        if staged is None:
            staged = self._dynalign_staged = []
        tensors = from_wire(bucket)
        staged.extend(tensors)
        return len(tensors)

    def dynalign_apply_staged_weights(self) -> int:
        staged = getattr(self, "_dynalign_staged", None) or []
        self._dynalign_staged = []
        self.reload_weights(weights_iterator=iter(staged))
        _repack_cpu_embedding_gemms(self.model_runner.get_model())
        return len(staged)

    def dynalign_apply_staged_adapter(self, peft_config: dict, adapter_id: int) -> int:
        """The staged tensors are a LoRA adapter (PEFT names): register it as ``adapter_id`` and
        drop every older version. Built from tensors in memory, not read from a directory, so no
        filesystem is shared with the learner; requests naming ``adapter_id`` then find it loaded
        (vLLM's manager only touches an adapter whose id it already holds)."""
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper

        staged = dict(getattr(self, "_dynalign_staged", None) or [])
        self._dynalign_staged = []
        manager = self.model_runner.lora_manager
        helper = PEFTHelper.from_dict(peft_config)
        helper.validate_legal(manager.lora_config)
        model = manager._adapter_manager.model
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        adapter = LoRAModel.from_lora_tensors(
            lora_model_id=adapter_id, tensors=staged, peft_helper=helper, device="cpu",
            dtype=manager.lora_config.lora_dtype, model_vocab_size=manager.vocab_size,
            weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
            skip_prefixes=getattr(model, "lora_skip_prefixes", None))
        for old in manager.list_adapters() - {adapter_id}:
            manager.remove_adapter(old)
        manager.remove_adapter(adapter_id)  # a restarted sync of the same version replaces it
        manager._adapter_manager.add_adapter(adapter)
        manager._adapter_manager.activate_adapter(adapter_id)
        return len(staged)

    def dynalign_adapter_ids(self) -> list[int]:
        return sorted(self.model_runner.lora_manager.list_adapters())

    def dynalign_weight_checksum(self) -> float:
        """Sum of all parameters (float64): tests use it to see that a sync changed the engine."""
        model = self.model_runner.get_model()
        with torch.no_grad():
            return float(sum(p.double().sum() for p in model.parameters()))


def _repack_cpu_embedding_gemms(model) -> None:
    """On CPU, redo the packed GEMM of every layer that keeps its weight (embeddings, LM heads).

    The CPU backend packs an LM head's weight into a kernel-specific copy after loading. With tied
    embeddings (Qwen2.5-0.5B, Llama-3.2-1B, ...) the head shares ``embed_tokens.weight``, so
    ``reload_weights`` updates the shared tensor but never re-processes the head: without this the
    engine samples from the new body through the old head (benchmarks/bench_sync.py catches it).
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    for module in model.modules():
        weight = getattr(module, "weight", None)
        method = getattr(module, "quant_method", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.numel() > 0 \
                and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(module)
