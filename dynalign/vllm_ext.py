"""Code that runs inside vLLM's worker processes (loaded by ``worker_extension_cls``).

The driver reaches these methods through ``LLM.collective_rpc``. Weights arrive as
safetensors-serialised buckets: on the CPU backend vLLM repacks linear weights after loading,
so a plain ``load_weights`` into the live model fails and the in-place ``reload_weights`` path
is required; it wants every weight in one call, so buckets are staged first, then applied.
"""

from __future__ import annotations

import torch


class WeightSyncExtension:
    """Mixed into vLLM's Worker class; ``self`` is the worker."""

    def dynalign_stage_weights(self, blob: bytes) -> int:
        from safetensors.torch import load

        staged = getattr(self, "_dynalign_staged", None)
        if staged is None:
            staged = self._dynalign_staged = []
        tensors = load(blob)
        staged.extend(tensors.items())
        return len(tensors)

    def dynalign_apply_staged_weights(self) -> int:
        staged = getattr(self, "_dynalign_staged", None) or []
        self._dynalign_staged = []
        self.reload_weights(weights_iterator=iter(staged))
        return len(staged)

    def dynalign_weight_checksum(self) -> float:
        """Sum of all parameters (float64): tests use it to see that a sync changed the engine."""
        model = self.model_runner.get_model()
        with torch.no_grad():
            return float(sum(p.double().sum() for p in model.parameters()))
