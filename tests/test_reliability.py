"""Reliability on real processes: exact resume after SIGKILL, graceful SIGTERM, atomic checkpoints."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

ITERATIONS = 6  # so that the third interruption below still leaves iterations to run


def _train_command(model_path: str, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dynalign.cli", "train", "--config", str(REPO / "configs/smoke.yaml"),
            f"model.path={model_path}", f"run_dir={run_dir}", "judge.kind=rule", f"iterations={ITERATIONS}",
            "learner.lr=5e-3", "checkpoint.every=1", "checkpoint.keep_last=5", "logging.progress=false",
            "logging.backends=[]", "logging.report=false", "cluster.num_cpus=4",
            # One step off: every interruption below lands while the next iteration's groups are
            # in production or kept by a checkpoint; the synchronous loop is the simpler case.
            "rollout.max_staleness=1", *extra]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING", PYTHONUNBUFFERED="1")
    return env


def _policy_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "policy" / "model.safetensors"))


def _prompt_ids(run_dir: Path) -> list:
    return [json.loads(line)["prompt_ids"] for line in (run_dir / "prompt_ids.jsonl").read_text().splitlines()]


def _run_processes(run_dir: Path) -> list[str]:
    """Processes still alive that belong to this run (their command line names its directory)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(run_dir) in line and "ps -eo" not in line]


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    """Same prompt ids iteration by iteration (none replayed, none skipped), bit-identical final
    weights, one metrics record per iteration, the same rewards in the run summary."""
    assert _prompt_ids(run_dir) == _prompt_ids(reference)
    assert len(_prompt_ids(reference)) == ITERATIONS
    ours, theirs = _policy_tensors(run_dir), _policy_tensors(reference)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert (ours[name] == theirs[name]).all(), f"{name} differs from the uninterrupted run"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == list(range(ITERATIONS))
    summary, reference_summary = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference))
    assert summary["iterations"] == ITERATIONS  # the whole run, not only what ran after the resume
    assert summary["reward_mean_per_iteration"] == reference_summary["reward_mean_per_iteration"]


@pytest.fixture(scope="module")
def straight_run(ray_local, tiny_model_path, tmp_path_factory) -> Path:
    """The uninterrupted run the interrupted one must reproduce exactly. It trains while another
    local Ray (``ray_local``, this process's) is up, as two experiments side by side would: the
    run must see neither error nor noise from the other cluster."""
    straight = tmp_path_factory.mktemp("straight") / "run"
    # No periodic checkpoints (~1.7 s each here): writing one changes nothing the run computes.
    ran = subprocess.run(_train_command(tiny_model_path, straight, "checkpoint.every=0"), env=_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    output = ran.stdout + ran.stderr
    assert ran.returncode == 0, output[-3000:]
    assert "multiple active Ray instances" not in output and "Traceback" not in output, output[-3000:]
    # A quiet console: dynalign's own lines, not the actors' (they are in the linked Ray logs).
    assert len(output.splitlines()) < 60 and "pid=" not in output and "WARNING" not in output, output[-3000:]
    logs = straight / "logs" / "ray"
    assert logs.is_symlink() and any(logs.glob("worker-*.err")), "the libraries' output must be kept"
    return straight


def _learner_rank_pids(driver_pid: int) -> list[int]:
    """Ray Train's rank processes under this driver (the driver started its own local Ray)."""
    import psutil

    return [p.pid for p in psutil.Process(driver_pid).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline())]


def _wait_until(condition, process: subprocess.Popen, what: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the run exited ({process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.2)


@pytest.mark.slow
def test_sigkills_and_sigterm_then_resume_match_the_uninterrupted_run(tiny_model_path, straight_run, tmp_path):
    """Three interruptions of one run, checked against an uninterrupted run with the same seeds:
    1. one learner rank is SIGKILLed once iteration 1 is logged: Ray Train restarts the rank group
       from the last checkpoint registered with it, and the driver replays from there;
    2. once the replayed iteration's checkpoint is written, the driver and its local Ray are
       SIGKILLed;
    3. `--resume latest`, with periodic checkpoints off, gets SIGTERM once it has logged an
       iteration: it finishes the iteration, writes a checkpoint of its own, exits 0 and leaves no
       process behind;
    4. `--resume latest` again finishes the run.
    The run is one step off (rollout.max_staleness=1), so each interruption meets groups produced
    ahead: in flight (discarded, the checkpoint's restored) or kept by the checkpoint.
    The final weights are bit-identical, no prompt is replayed or skipped, the metrics are whole."""
    run_dir, log_path = tmp_path / "run", tmp_path / "first.log"

    def logged() -> int:
        return len(_prompt_ids(run_dir)) if (run_dir / "prompt_ids.jsonl").exists() else 0

    with log_path.open("w") as log:
        process = subprocess.Popen(_train_command(tiny_model_path, run_dir), env=_env(), cwd=REPO, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until(lambda: logged() >= 2, process, "iteration 1")  # so iteration 0's checkpoint is registered
        ranks = _learner_rank_pids(process.pid)
        assert len(ranks) == 2, f"expected the smoke config's 2 learner ranks, found {ranks}"
        os.kill(ranks[-1], signal.SIGKILL)

        replay = re.compile(r"it restarted from \S+/checkpoints/iter_(\d+); replaying from iteration (\d+)")
        _wait_until(lambda: replay.search(log_path.read_text()), process, "the replay")
        replay_seen = time.time()
        first_replayed = int(replay.search(log_path.read_text()).group(2))
        manifest = run_dir / "checkpoints" / f"iter_{first_replayed:06d}" / "manifest.json"
        _wait_until(lambda: manifest.exists() and manifest.stat().st_mtime > replay_seen, process,
                    f"the replayed iteration {first_replayed}'s checkpoint")
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the local Ray it started
        process.wait()
    output = log_path.read_text()
    print("\n".join(line for line in output.splitlines() if "dynalign: warning" in line))
    assert "Ray Train restarted the learner group (a rank died)" in output
    assert first_replayed in (1, 2) and not (run_dir / "policy").exists()

    resumed = time.time()
    process = subprocess.Popen(_train_command(tiny_model_path, run_dir, "checkpoint.every=0") + ["--resume", "latest"],
                               env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ids_log = run_dir / "prompt_ids.jsonl"
    _wait_until(lambda: ids_log.stat().st_mtime > resumed and logged() >= first_replayed + 2, process,
                "an iteration of the resumed run")
    signalled = time.time()
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-2000:]
    assert "SIGTERM received" in output
    iterations_done = len((run_dir / "metrics.jsonl").read_text().splitlines())
    assert first_replayed + 2 <= iterations_done < ITERATIONS
    stop_manifest = run_dir / "checkpoints" / f"iter_{iterations_done - 1:06d}" / "manifest.json"
    assert stop_manifest.exists() and stop_manifest.stat().st_mtime > signalled, "SIGTERM must write a checkpoint"
    time.sleep(2)
    assert _run_processes(run_dir) == []

    subprocess.run(_train_command(tiny_model_path, run_dir) + ["--resume", "latest"], env=_env(), cwd=REPO,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    _assert_same_run(run_dir, straight_run)


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB filesystem (tmpfs) so that 'disk full' is the kernel's ENOSPC, not a mock."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                             capture_output=True).returncode == 0
    assert mounted, "this test needs root to mount a small tmpfs (CI and dev machines run as root)"
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


class FakeLearnerWritingShards:
    """Stands in for the DeepSpeed learner's file writes only: it writes real bytes to the real
    (small) disk, so a large shard runs into a real 'No space left on device'."""

    def __init__(self, shard_bytes: int):
        self.shard_bytes = shard_bytes

    def save_checkpoint(self, directory):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "mp_rank_00_model_states.pt").write_bytes(os.urandom(self.shard_bytes))

    def save_policy(self, directory, dtype_name=None):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "model.safetensors").write_bytes(b"w" * 1024)


def test_full_disk_leaves_no_partial_checkpoint_and_keeps_the_previous(small_disk):
    from dynalign import checkpoint

    first = checkpoint.save(small_disk, 0, FakeLearnerWritingShards(64 * 1024),
                            {"prompts": {"epoch": 0, "position": 4}}, keep_last=2)
    with pytest.raises(OSError, match="No space left on device"):
        checkpoint.save(small_disk, 1, FakeLearnerWritingShards(512 * 1024), {"prompts": {}}, keep_last=2)
    root = checkpoint.checkpoint_root(small_disk)
    assert sorted(p.name for p in root.iterdir()) == ["iter_000000"]  # no temp dir left behind
    assert checkpoint.resolve(small_disk, "latest") == first
    assert checkpoint.load_state(first) == {"prompts": {"epoch": 0, "position": 4}, "iteration": 0}
    assert (first / "learner" / "mp_rank_00_model_states.pt").stat().st_size == 64 * 1024


def test_keep_last_prunes_old_checkpoints(tmp_path):
    from dynalign import checkpoint

    for iteration in range(4):
        checkpoint.save(tmp_path, iteration, FakeLearnerWritingShards(16), {"prompts": {}}, keep_last=2)
    root = checkpoint.checkpoint_root(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["iter_000002", "iter_000003"]
    (root / "iter_000004").mkdir()  # no manifest: not a checkpoint
    assert checkpoint.resolve(tmp_path, "latest").name == "iter_000003"
