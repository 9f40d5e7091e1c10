"""Weight sync: the learner's new weights reach every rollout and judge engine.

``reload`` (CPU, and any device): rank 0 serialises the full weights (gathered under ZeRO-3) in
buckets into the object store; each engine stages the buckets and reloads in place. With LoRA
(``learner.lora.rank > 0``) only the adapter travels that way, and each engine loads it from
memory as a new adapter version, unloading the old one.
``nccl`` (GPU): vLLM's native weight-transfer API broadcasts from learner rank 0 to the engines.
Both time out with the names of the engines that did not finish, instead of hanging.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import ray

from dynalign.config import TrainConfig
from dynalign.nccl_sync import NcclWeightSync
from dynalign.sync_backend import WeightSyncError, choose_backend


class SyncedEngines:
    """The engine actors that hold the policy's weights, and everything done to all of them: the
    rollout pool adds its engines, a dedicated policy judge its own (``add``, at their start); the
    weight sync targets ``workers`` (named ``names``) and, once it exists, ``restore`` puts its
    current weights into an engine that Ray restarted (before, the initial weights are current);
    with ``rollout.sleep_while_learning`` the engines sleep while the learner steps (``asleep``).
    ``get`` waits on actor calls (``ray.get``; tests pass a stand-in)."""

    def __init__(self, sleep_while_learning: bool = False, get=None):
        self.workers: list = []
        self.names: list[str] = []
        self.sleep_while_learning = sleep_while_learning
        self._get = get or ray.get
        self._weights = None  # the WeightSync holding the current weights, once there is one

    def add(self, workers: list, names: list[str]) -> None:
        self.workers += workers
        self.names += names

    def restore_from(self, weight_sync) -> None:
        """``weight_sync`` holds the current weights from now on (it calls this once it exists)."""
        self._weights = weight_sync

    def restore(self, worker, name: str) -> None:
        """Put the current weights into ``worker``, an engine Ray restarted (it came back with the
        model's initial weights)."""
        if self._weights is not None:
            self._weights.restore(worker, name)

    def sleep(self, level: int = 1) -> None:
        """vLLM sleep mode on every engine (level 1: weights to host memory, KV cache freed; GPU only)."""
        self._get([worker.sleep.remote(level) for worker in self.workers])

    def wake_up(self) -> None:
        self._get([worker.wake_up.remote() for worker in self.workers])

    @contextmanager
    def asleep(self):
        """With ``rollout.sleep_while_learning`` every engine sleeps inside (so the learner can
        use their GPU memory) and wakes up after, before the weight sync; otherwise nothing."""
        if not self.sleep_while_learning:
            yield
            return
        self.sleep()
        try:
            yield
        finally:
            self.wake_up()


class WeightSync:
    """Pushes the learner's weights into every engine of ``engines`` (``sync``) and becomes what
    ``engines.restore`` restores from."""

    def __init__(self, config: TrainConfig, engines: SyncedEngines):
        self.config = config
        self.engines = engines
        self.backend = choose_backend(config)
        self.last_export, self.version = None, 0  # what a restarted engine must get back
        if self.backend == "nccl":
            # Same contract, other transport: these instance attributes stand in for the methods below.
            nccl = NcclWeightSync(config, engines.workers, engines.names, after_sync=self._record_version)
            self.sync, self.restore = nccl.sync, nccl.restore
        elif self.backend != "reload":
            raise WeightSyncError(f"sync.backend = '{self.backend}' is not available in this build; use sync.backend=reload")
        engines.restore_from(self)

    def sync(self, learner, version: int) -> dict[str, float]:
        """Push the learner's weights into every engine; returns seconds and bytes moved."""
        started = time.perf_counter()
        exported = learner.export_weights(int(self.config.sync.bucket_mb * 2**20), self.config.engine_dtype)
        export_seconds = time.perf_counter() - started
        pending = {}
        for engine, name in zip(self.engines.workers, self.engines.names):
            staged = [engine.stage_weights.remote(bucket) for bucket in exported["buckets"]]
            # Actor calls run in order, so apply runs after every bucket is staged.
            pending[self._apply(engine, exported, version)] = (name, staged)
        self._wait(pending, started)
        self.last_export, self.version = exported, version
        seconds = time.perf_counter() - started
        moved = exported["bytes"] * len(self.engines.workers)
        return {"sync_seconds": seconds, "sync_export_seconds": export_seconds, "sync_bytes": float(moved),
                "sync_buckets": float(len(exported["buckets"])), "sync_gb_per_s": moved / max(seconds, 1e-9) / 1e9}

    def restore(self, engine, name: str) -> None:
        """Give an engine that Ray restarted (it came back with the initial weights) the weights of
        the last sync; the object store still holds that export."""
        if self.last_export is None:
            return
        started = time.perf_counter()
        staged = [engine.stage_weights.remote(bucket) for bucket in self.last_export["buckets"]]
        self._wait({self._apply(engine, self.last_export, self.version): (name, staged)}, started)

    def _record_version(self, version: int) -> None:
        """The NCCL transfer bypasses ``apply_staged_weights``: tell the engines which version they hold."""
        started = time.perf_counter()
        self._wait({engine.set_weight_version.remote(version): (name, [])
                    for engine, name in zip(self.engines.workers, self.engines.names)}, started)

    @staticmethod
    def _apply(engine, exported: dict, version: int):
        """Apply what ``engine`` staged: a LoRA adapter (the export carries its PEFT config), or the weights."""
        if "peft_config" in exported:
            return engine.apply_staged_adapter.remote(version, exported["peft_config"])
        return engine.apply_staged_weights.remote(version)

    def _wait(self, pending: dict, started: float) -> None:
        deadline = started + self.config.sync.timeout_s
        remaining = list(pending)
        while remaining:
            ready, remaining = ray.wait(remaining, num_returns=len(remaining), timeout=max(0.0, deadline - time.perf_counter()))
            for ref in ready:
                ray.get(ref)  # surfaces an engine's error
            if remaining and time.perf_counter() >= deadline:
                names = ", ".join(pending[ref][0] for ref in remaining)
                raise WeightSyncError(f"weight sync stalled: {names} did not finish within sync.timeout_s = "
                                      f"{self.config.sync.timeout_s:g} s")
