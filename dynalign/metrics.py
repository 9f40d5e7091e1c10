"""Metrics to a JSONL file (one line per iteration) and TensorBoard."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path

from dynalign.files import append_jsonl, read_jsonl


class MetricsLogger:
    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        record = {"iteration": iteration, "time": time.time(), **metrics}
        append_jsonl(self.path, record)
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key.replace(".", "/", 1), value, iteration)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every record of ``run_dir/metrics.jsonl`` (a last line cut by a crash is skipped)."""
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


class Timings:
    """Seconds spent per named phase of an iteration."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def summary(self) -> dict[str, float]:
        total = time.perf_counter() - self.started
        out = {f"time.{k}": v for k, v in self.seconds.items()}
        out["time.total"] = total
        out["time.other"] = max(0.0, total - sum(self.seconds.values()))
        return out
