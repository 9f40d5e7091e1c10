"""What both weight-sync transports share: the error they raise and the choice between them."""

from __future__ import annotations

from dynalign.config import RunError, TrainConfig


class WeightSyncError(RunError):
    pass


def choose_backend(config: TrainConfig) -> str:
    if config.sync.backend != "auto":
        return config.sync.backend
    if config.learner.lora.enabled:  # an adapter is small: the object-store path, on any device
        return "reload"
    # The in-place reload path works everywhere; NCCL needs whole GPUs on both sides (fractional
    # GPUs share a device, and NCCL refuses two ranks of one group on the same GPU).
    return "nccl" if config.rollout.num_gpus_per_worker >= 1 and config.learner.num_gpus_per_rank >= 1 else "reload"
