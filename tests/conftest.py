"""Shared fixtures: a tiny model built once per session, and one local Ray for the loop tests."""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Every process the suite starts (Ray, vLLM engines, runs in subprocesses, their children)
# inherits this variable: what still carries it after the session is a leak.
SESSION_MARK = "DYNALIGN_TEST_SESSION"
os.environ[SESSION_MARK] = uuid.uuid4().hex

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
# Ray Train's controller registers checkpoints and notices a finished run on this poll (default
# 2 s): a shorter one saves ~1 s per checkpoint and per learner shutdown in every test run. Ray
# processes the tests start inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Two Ray Train services no test exercises: the preemption watcher (an actor per learner start,
# polling for spot-node notices) and the Prometheus metrics callbacks. Together ~10 CPU-s per
# learner start on this machine (a 6-iteration smoke run: 83-94 -> 76-85 CPU-s), and the suite
# starts ~30 learners on 2 cores.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    from dynalign.tiny_model import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting one costs ~10 s), shut down at its end. It is
    started the way `dynalign train` starts its own, with the cluster's address pinned in every
    worker, so runs in subprocesses and other clusters started meanwhile never mistake one
    cluster for another."""
    import ray

    from dynalign.placement import start_local_ray

    if not ray.is_initialized():
        start_local_ray(6, {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"})
    yield ray
    ray.shutdown()


# float32 engines for the std-0.1 model, whatever `model.dtype=auto` picks on this CPU (bfloat16 where
# it has AVX-512 BF16): its logits are ~5x the 0.02 model's, and bf16 engine weights alone put the
# engine's log-probs up to 0.086 from the float32 learner's before any training (measured on an
# Intel Xeon with AMX), over the 0.05 bound with which the tests tell a landed sync from a skipped one.
EXACT_ENGINE = ("model.dtype=float32",)

# The shared learning runs train with one learner rank on one thread: they are about learning, and
# rank groups are tested elsewhere (test_loop's sync test, test_reliability, test_lora's adapter
# test). One rank fewer to start and to step with (alone, a run took 75 instead of 90 CPU-s), and one
# thread because `make test` runs two pytest workers on the two cores: a two-thread process there
# stalls at every parallel region whose other thread is descheduled (the one-rank, two-thread run took
# 3.6 min in CI against 2.8 for two one-thread ranks).
SUITE_THREADS = ("learner.threads_per_rank=1", "rollout.threads_per_engine=1")
SHARED_RUN = ("learner.num_ranks=1", *SUITE_THREADS)


@pytest.fixture(scope="session")
def rule_learning_run(ray_local, tiny_model_path, tmp_path_factory):
    """One GRPO run with a rule reward (8 iterations, fixed seeds), shared: the learning test checks
    its rewards and the evaluation test compares its policy with the initial model."""
    from dynalign.driver import train

    config = tiny_config(tiny_model_path, tmp_path_factory.mktemp("rule_learning") / "run", "judge.kind=rule",
                         "iterations=8", "learner.lr=5e-3", "rollout.group_size=8", "data.prompts_per_iteration=8", *SHARED_RUN,
                         "logging.report=true")
    return config, train(config)


@pytest.fixture(scope="session")
def rule_learning_run_stale(ray_local, tiny_model_path, tmp_path_factory):
    """The rule-reward run of ``rule_learning_run`` one step off (rollout.max_staleness=1): each
    iteration's groups are generated and judged while the learner steps on the previous one's.
    It checkpoints every 3 iterations, so test_loop's resume test can resume a copy of it from
    iteration 5, when iteration 6's groups were already produced."""
    from dynalign.driver import train

    config = tiny_config(tiny_model_path, tmp_path_factory.mktemp("rule_learning_stale") / "run", "judge.kind=rule",
                         "iterations=8", "learner.lr=5e-3", "rollout.group_size=8", "data.prompts_per_iteration=8", *SHARED_RUN,
                         "rollout.max_staleness=1", "checkpoint.every=3", "logging.backends=[]")
    return config, train(config)


@pytest.fixture(scope="session")
def tiny_model_std01_path(tmp_path_factory) -> str:
    """The tiny model with weights of std 0.1 instead of 0.02, for LoRA (see ``rule_learning_run_lora``)."""
    from dynalign.tiny_model import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-std0.1", init_std=0.1))


@pytest.fixture(scope="session")
def rule_learning_run_lora(ray_local, tiny_model_std01_path, tmp_path_factory):
    """The rule-reward run of ``rule_learning_run`` training a LoRA adapter instead of every weight.
    Its tiny model has weights of std 0.1, not 0.02: the adapter cannot change the final norm or
    the LM head, so the logits' range is bounded by the head's row norms (0.02 * sqrt(128) = 0.23
    per row), and on the 0.02 model the digit share only went 0.0195 -> 0.037 in 8 iterations
    (entropy flat at 5.74) whatever the learning rate; a full fine-tune changes the head itself.
    It checkpoints every 3 iterations, so test_lora's resume test can resume a copy of it."""
    from dynalign.driver import train

    config = tiny_config(tiny_model_std01_path, tmp_path_factory.mktemp("rule_learning_lora") / "run", "judge.kind=rule",
                         "iterations=8", "learner.lr=2e-2", "rollout.group_size=8", "data.prompts_per_iteration=8",
                         "learner.lora.rank=16", "learner.lora.alpha=64", "checkpoint.every=3", *EXACT_ENGINE,
                         *SHARED_RUN, "logging.backends=[]")
    return config, train(config)


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


# Python's own helpers of this process (multiprocessing's resource tracker, its fork server): they
# end when this interpreter does, so they are not left behind.
OWN_HELPERS = ("from multiprocessing.resource_tracker import main", "from multiprocessing.forkserver import main")


def processes_marked(name: str, value: str) -> list[str]:
    """'PID COMMAND' of each live process (not this one, nor its interpreter helpers) whose
    environment holds ``name=value``."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if parent == os.getpid() and any(helper in command for helper in OWN_HELPERS):
                    continue
                found.append(f"{entry.name} {command[:120]}")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def wait_for_no_processes(name: str, value: str, timeout_s: float = 30.0) -> list[str]:
    """The processes marked ``name=value`` still alive after up to ``timeout_s`` (shutdowns take a moment)."""
    deadline = time.monotonic() + timeout_s
    while (left := processes_marked(name, value)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


# The files of end-to-end tests, longest first (CI's durations). `make test TEST_WORKERS=2` runs
# two pytest workers that take tests in this order (--no-loadscope-reorder): the long ones start at once and
# the fast ones fill in at the end, so neither worker waits alone on a long test while the other
# is idle. Within a file the order stays as written (the vllm serve death test runs last). The
# four-node cluster starts after the first wave of start-ups (at the very start of the suite its
# head once missed Ray's 30 s registration deadline; tests/cluster_scenarios.py retries it).
LONGEST_FIRST = ("test_reliability.py", "test_real_model.py", "test_eval.py", "test_faults.py", "test_loop.py",
                 "test_cluster.py", "test_lora.py", "test_prompt_gen.py", "test_openai_endpoint.py", "test_judge.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        if item.get_closest_marker("slow") is None:
            return len(LONGEST_FIRST) + 1
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable
    _tag_xdist_groups(config, items)


def _tag_xdist_groups(config, items) -> None:
    """With `--dist loadgroup`, send each xdist_group's tests to one worker, so that what they share
    starts once. pytest-xdist 3.8 tags them by rewriting ``item._nodeid``, which pytest 9.2 no
    longer reads (a node keeps a structured ``_id``): every group was silently split across the
    workers, and each shared run, cluster and server started once per worker."""
    if not getattr(config.option, "loadgroup", False):  # set in the workers of `--dist loadgroup`
        return
    for item in items:
        names = sorted({str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                        for mark in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(names)
        if names and not item.nodeid.endswith(suffix) and hasattr(item, "_id"):
            item._id = type(item._id).parse(item.nodeid + suffix)


def pytest_sessionfinish(session, exitstatus):
    """Fail the session if any process it started outlives it (orphaned engines hold GBs)."""
    import ray

    if session.config.pluginmanager.hasplugin("dsession"):
        return  # pytest -n: this is the controller; each worker checks what it started (its own mark)

    if ray.is_initialized():
        ray.shutdown()
    left = wait_for_no_processes(SESSION_MARK, os.environ[SESSION_MARK])
    if left:
        print(f"\nleftover processes started by the test session ({len(left)}):\n  " + "\n  ".join(left))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def process_group():
    """A one-rank gloo group, set up the way Ray Train sets up each rank's (LOCAL_RANK and all).
    One per test process, kept to its end: DeepSpeed caches its groups on first use, and a second
    group after the first was destroyed left it holding an unregistered one (test_lora after
    test_learner_step in one xdist worker)."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        yield
        dist.destroy_process_group()
