"""Trackers (``logging.backends``): each iteration's metrics and the resolved config reach
TensorBoard, wandb (offline: run_dir/wandb) and mlflow (a local file store: run_dir/mlruns), read
back with each tool's own reader; no network, no Ray. A configured tracker whose package is
missing is refused when the config is checked, in one line."""

from __future__ import annotations

import json
import math
import struct
import sys
import zlib

import pytest

from dynalign.config import ConfigError, describe, load_config, to_yaml

METRICS = [
    {"reward_mean": 0.25, "judge.invalid_share": 0.0, "learner.loss": float("nan"), "time.total": 3.0},
    {"reward_mean": 0.75, "judge.invalid_share": 0.125, "learner.loss": 1.5, "time.total": 2.5},
]


@pytest.fixture
def wandb_home(tmp_path, monkeypatch):
    """wandb's own settings and caches in the test's directory, not the user's home; no tracker
    settings from the environment (MetricsLogger sets MLFLOW_ALLOW_FILE_STORE itself: it is
    removed again after the test)."""
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    for name in ("WANDB_MODE", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def _logged_run(run_dir, *overrides):
    from dynalign.metrics import MetricsLogger

    config = load_config(None, [f"run_dir={run_dir}", "logging.backends=[tensorboard,wandb,mlflow]",
                                "logging.project=dynalign-test", *overrides])
    logger = MetricsLogger(run_dir, config)
    for iteration, metrics in enumerate(METRICS):
        logger.log(iteration, metrics)
    logger.close()
    return config


def wandb_records(run_path) -> list:
    """The records of an offline wandb run's ``.wandb`` file, as wandb's own protobuf messages. The
    file is a LevelDB-style log (what `wandb sync` uploads): a 7-byte header, then 32 KiB blocks
    of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_path.glob("*.wandb")
    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7])[:2] == (b":W&B", 0xBEE1)
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if left < 7 or (length == 0 and kind == 0):  # the rest of a block is padding
            position += left
            continue
        chunk = data[position + 7:position + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: a damaged chunk at byte {position}"
        position += 7 + length
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(run_path) -> tuple[list[dict], dict]:
    """The history rows and the config of an offline wandb run."""
    rows, config = [], {}
    for record in wandb_records(run_path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
        elif kind in ("run", "config"):
            update = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in update})
    return rows, config


def test_metrics_and_config_reach_every_tracker(tmp_path, wandb_home):
    run_dir = tmp_path / "run"
    config = _logged_run(run_dir, "logging.run_name=two-iterations")

    # metrics.jsonl, as without trackers
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward_mean"] for r in records] == [0.25, 0.75]

    # TensorBoard: scalars (a NaN is left out), the config as text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward_mean")] == [(0, 0.25), (1, 0.75)]
    assert [(e.step, e.value) for e in events.Scalars("judge/invalid_share")] == [(0, 0.0), (1, 0.125)]
    assert [(e.step, e.value) for e in events.Scalars("learner/loss")] == [(1, 1.5)]
    (text,) = events.Tensors("config/text_summary")
    logged = text.tensor_proto.string_val[0].decode()
    assert "    project: dynalign-test" in logged and "    zero_stage: 2" in logged
    assert logged.replace("\n    ", "\n").strip() == to_yaml(config).strip()

    # wandb: one offline run under run_dir/wandb; its history holds both iterations, its config the options
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    rows, wandb_config = wandb_history(wandb_run)
    assert [row["iteration"] for row in rows] == [0, 1]
    assert [row["reward_mean"] for row in rows] == [0.25, 0.75]
    assert [row["judge/invalid_share"] for row in rows] == [0.0, 0.125]
    assert "learner/loss" not in rows[0] and rows[1]["learner/loss"] == 1.5
    assert wandb_config["learner"]["zero_stage"] == 2
    assert wandb_config["logging"]["backends"] == ["tensorboard", "wandb", "mlflow"]

    # mlflow: a finished run in the local file store, metrics per iteration, every option a parameter
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("dynalign-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "two-iterations" and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "reward_mean")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.25), (1, 0.75)]
    loss = client.get_metric_history(run.info.run_id, "learner.loss")
    assert [(m.step, m.value) for m in loss] == [(1, 1.5)]
    assert run.data.metrics["time.total"] == 2.5
    params = run.data.params
    assert set(params) == {key for key, _, _ in describe()}
    assert params["learner.zero_stage"] == "2" and params["logging.project"] == "dynalign-test"
    assert json.loads(params["logging.backends"]) == ["tensorboard", "wandb", "mlflow"]
    assert json.loads(params["generation.generators"])[0]["source"] == "policy"
    assert math.isclose(float(params["learner.lr"]), config.learner.lr)


def test_run_name_defaults_to_the_run_dir_and_the_store_can_be_elsewhere(tmp_path, wandb_home):
    """No run name: the run_dir's folder name; a tracking URI of the user's own: runs go there."""
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "shared-store").resolve().as_uri()
    _logged_run(tmp_path / "my-run", "logging.backends=[mlflow]", f"logging.mlflow_tracking_uri={store}")
    assert not (tmp_path / "my-run" / "mlruns").exists() and not (tmp_path / "my-run" / "tensorboard").exists()
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("dynalign-test").experiment_id])
    assert run.info.run_name == "my-run"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "reward_mean")) == [0, 1]


def test_backends_option_is_checked_and_tensorboard_still_works():
    assert load_config(None, []).logging.backends == ["tensorboard"]
    assert load_config(None, ["logging.backends=[]"]).logging.backends == []
    # logging.tensorboard, the option before logging.backends: false takes tensorboard out, true puts it in
    assert load_config(None, ["logging.tensorboard=false"]).logging.backends == []
    assert load_config(None, ["logging.backends=[]", "logging.tensorboard=true"]).logging.backends == ["tensorboard"]
    for overrides, message in [
        (["logging.backends=[tensorboard,neptune]"], "logging.backends = .* 'neptune' is not one of tensorboard, wandb, mlflow"),
        (["logging.backends=tensorboard"], "logging.backends = 'tensorboard' .* must be a list of tensorboard, wandb, mlflow"),
        (["logging.backends=[tensorboard,tensorboard]"], r"logging.backends = \[tensorboard, tensorboard\]: tensorboard is named twice"),
        (["logging.tensorboard=maybe"], "logging.tensorboard = 'maybe' .* must be true or false"),
        (["logging.wandb_mode=shared"], "logging.wandb_mode = 'shared' .* must be one of offline, online"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)


@pytest.mark.parametrize("backend", ["wandb", "mlflow"])
def test_a_tracker_whose_package_is_missing_is_refused_in_one_line(monkeypatch, backend):
    monkeypatch.setitem(sys.modules, backend, None)  # `import wandb` fails, as where it is not installed
    with pytest.raises(ImportError):
        __import__(backend)
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"logging.backends=[tensorboard,{backend}]"])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"logging.backends = [tensorboard, {backend}]: the {backend} tracker needs the "
                              f"{backend} package, which is not installed; pip install {backend} "
                              "(or pip install 'dynalign[trackers]')"), message
    assert load_config(None, ["logging.backends=[tensorboard]"]).logging.backends == ["tensorboard"]


def test_the_cli_refuses_a_missing_tracker_before_anything_starts(monkeypatch, capsys):
    from dynalign.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)
    assert main(["config", "logging.backends=[wandb]"]) != 0
    err = capsys.readouterr().err
    assert "logging.backends = [wandb]: the wandb tracker needs the wandb package" in err
    assert len(err.strip().splitlines()) == 1
