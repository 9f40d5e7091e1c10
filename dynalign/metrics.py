"""Metrics: one line per iteration in ``run_dir/metrics.jsonl`` (always), and the same numbers in
every tracker of ``logging.backends``:

- ``tensorboard``: scalars under ``run_dir/tensorboard``, the resolved config as text;
- ``wandb``: a run under ``run_dir/wandb``, offline by default (``wandb sync`` uploads it later),
  the resolved config as the run's config;
- ``mlflow``: a run in a local file store (``run_dir/mlruns``) unless
  ``logging.mlflow_tracking_uri`` names another, the flattened config as its parameters.

wandb and mlflow are optional packages (extra ``trackers``), imported only when configured;
``LoggingConfig.check`` refuses a configured one that is not installed before the run starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

from dynalign.config import TrainConfig, to_dict, to_yaml
from dynalign.files import append_jsonl, read_jsonl

log = logging.getLogger(__name__)


class MetricsLogger:
    """Writes each iteration's metrics to ``run_dir/metrics.jsonl`` and to the trackers that
    ``config.logging.backends`` names (none without a config); each tracker gets ``config`` once,
    at start. ``writer`` is the TensorBoard writer (None without that tracker), for histograms."""

    def __init__(self, run_dir: str | Path, config: TrainConfig | None = None):
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.trackers: list = []
        try:
            for backend in config.logging.backends if config is not None else ():
                self.trackers.append(TRACKERS[backend](run_dir, config))
        except BaseException:
            self.close()
            raise
        self.writer = next((t.writer for t in self.trackers if isinstance(t, TensorBoardTracker)), None)

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        record = {"iteration": iteration, "time": time.time(), **metrics}
        append_jsonl(self.path, record)
        scalars = {key: value for key, value in metrics.items()
                   if isinstance(value, (int, float)) and math.isfinite(value)}
        for tracker in self.trackers:
            try:
                tracker.log(iteration, scalars)
            except Exception as err:  # a tracker's outage (a remote server) must not end a long run
                log.warning("logging.backends: %s could not log iteration %d (%s); metrics.jsonl has it",
                            tracker.name, iteration, str(err).splitlines()[0] if str(err) else type(err).__name__)

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            try:
                tracker.close()
            except Exception as err:
                log.warning("logging.backends: %s did not close cleanly (%s)", tracker.name,
                            str(err).splitlines()[0] if str(err) else type(err).__name__)


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, run_dir: Path, config: TrainConfig):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        # Markdown: indented lines are a code block, so the YAML keeps its layout.
        self.writer.add_text("config", "\n".join(f"    {line}" for line in to_yaml(config).splitlines()), 0)
        self.writer.flush()

    def log(self, iteration: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key.replace(".", "/", 1), value, iteration)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A wandb run, by default offline (no network: files under ``run_dir/wandb`` only). Metrics
    are plotted against ``iteration`` (not wandb's own step, which may not go back: a replay after
    a learner restart logs earlier iterations again)."""

    name = "wandb"

    def __init__(self, run_dir: Path, config: TrainConfig):
        import wandb

        options = config.logging
        self.run = wandb.init(
            project=options.project, name=options.run_name or run_dir.name, dir=str(run_dir),
            mode=options.wandb_mode, config=to_dict(config),
            # console=off, silent: dynalign's console (messages, progress bar) stays as it is.
            settings=wandb.Settings(console="off", silent=True))
        self.run.define_metric("iteration")
        self.run.define_metric("*", step_metric="iteration")

    def log(self, iteration: int, scalars: dict[str, float]) -> None:
        self.run.log({"iteration": iteration, **{key.replace(".", "/", 1): v for key, v in scalars.items()}})

    def close(self) -> None:
        import wandb

        self.run.finish()
        wandb.teardown()  # and its service process (wandb-core): nothing of the run outlives it


class MlflowTracker:
    """An mlflow run through the tracking client (no global state): the experiment
    ``logging.project``, the flattened config as parameters, metrics with the iteration as step."""

    name = "mlflow"

    def __init__(self, run_dir: Path, config: TrainConfig):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        options = config.logging
        uri = options.mlflow_tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # mlflow >= 3.13 keeps its file store (a plain directory: no server, no database
            # package) behind this opt-in; a user's own MLFLOW_ALLOW_FILE_STORE stays as it is.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(options.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(options.project)
        self.run_id = self.client.create_run(experiment_id, run_name=options.run_name or run_dir.name).info.run_id
        params = [Param(mlflow_key(key), value[:6000]) for key, value in option_values(config).items()]
        for start in range(0, len(params), 100):  # log_batch takes at most 100 parameters
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, iteration: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(key), float(value), now, iteration) for key, value in scalars.items()]
        for start in range(0, len(metrics), 1000):  # and at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


def option_values(config, prefix: str = "") -> dict[str, str]:
    """Every option of ``config`` (the keys ``config.describe`` lists) with its value as text:
    lists and mappings as JSON."""
    values = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            values.update(option_values(value, f"{prefix}{f.name}."))
        else:
            values[f"{prefix}{f.name}"] = (json.dumps(value, default=dataclasses.asdict)
                                           if isinstance(value, (list, dict)) else str(value))
    return values


def mlflow_key(key: str) -> str:
    """mlflow takes names of letters, digits, ``_ - . / :`` and spaces only."""
    return re.sub(r"[^\w\-./: ]", "_", key)


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

    def phases(self) -> dict[str, float]:
        return {f"time.{k}": v for k, v in self.seconds.items()}

    def summary(self) -> dict[str, float]:
        total = time.perf_counter() - self.started
        out = self.phases()
        out["time.total"] = total
        out["time.other"] = max(0.0, total - sum(self.seconds.values()))
        return out
