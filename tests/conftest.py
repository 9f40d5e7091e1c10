"""Shared fixtures: a tiny model built once per session, and one local Ray for the loop tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
# Ray Train's controller registers checkpoints and notices a finished run on this poll (default
# 2 s): a shorter one saves ~1 s per checkpoint and per learner shutdown in every test run. Ray
# processes the tests start inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    from dynalign.tiny_model import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray per test module (starting Ray costs ~10 s). Not per session: tests that start
    their own cluster (subprocess runs, a token-auth head) must not find a second one alive."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=6, runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING",
                                                       "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


def tiny_config(model_path: str, run_dir: Path, *overrides: str):
    """The smoke config pointed at the session's tiny model, with test overrides."""
    return repo_config("smoke.yaml", model_path, run_dir, *overrides)


def repo_config(name: str, model_path: str, run_dir: Path, *overrides: str):
    """configs/NAME pointed at ``model_path`` and ``run_dir``, quiet, with test overrides."""
    from dynalign.config import load_config

    return load_config(REPO / "configs" / name,
                       [f"model.path={model_path}", f"run_dir={run_dir}",
                        f"data.prompts_path={REPO / 'configs/prompts/smoke_prompts.jsonl'}",
                        f"judge.value_spec={REPO / 'configs/values/collective_agency.yaml'}",
                        "logging.progress=false", "logging.report=false", *overrides])
