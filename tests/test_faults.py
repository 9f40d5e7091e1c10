"""Actor failures on the real stack: a rollout engine's and a judge engine's processes are
SIGKILLed mid-call during a run; Ray restarts them, the driver restores the current weights and
retries their share: no group lost, none counted twice, and the restarted engines serve the
current policy. (Learner ranks: tests/test_reliability.py.)"""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.conftest import tiny_config

pytestmark = pytest.mark.slow


class ActorKiller:
    """Watches this machine's processes and SIGKILLs, once, the first Ray actor process seen
    *running* each target method (Ray titles a busy actor process ``ray::Class.method``), but only
    once ``armed()`` is true."""

    def __init__(self, targets: list[str], armed):
        import threading

        self.targets, self.armed, self.killed = targets, armed, {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join()

    def _watch(self) -> None:
        import psutil

        while not self.stopped.is_set() and len(self.killed) < len(self.targets):
            if self.armed():
                for process in psutil.process_iter(["pid", "cmdline"]):
                    title = " ".join(process.info["cmdline"] or [])
                    for target in self.targets:
                        if target not in self.killed and title.startswith(f"ray::{target}"):
                            os.kill(process.info["pid"], signal.SIGKILL)
                            self.killed[target] = process.info["pid"]
            self.stopped.wait(0.02)


def test_rollout_and_judge_actors_killed_mid_call_run_completes(ray_local, tiny_model_path, tmp_path, capfd):
    """A whole run through the driver while a rollout engine's process is SIGKILLed in the middle of
    generating, and a dedicated judge engine's in the middle of scoring (both after the first weight
    sync): the run completes, every iteration scores exactly the groups it asked for, each prompt
    once, and the restarted engines serve the current weights."""
    from dynalign.driver import train
    from dynalign.metrics import read_metrics

    run_dir = tmp_path / "run"
    prompts_per_iteration, group_size = 4, 4
    config = tiny_config(tiny_model_path, run_dir, "iterations=3", "judge.engine=dedicated", "rollout.num_workers=1",
                         f"data.prompts_per_iteration={prompts_per_iteration}", f"rollout.group_size={group_size}",
                         "learner.lr=1e-2", "logging.backends=[]", "checkpoint.every=0",
                         "learner.num_ranks=1")  # the engines are what this test is about
    with ActorKiller(["RolloutWorker.generate_groups", "JudgeWorker.judge_groups"],
                     armed=lambda: (run_dir / "metrics.jsonl").exists()) as killer:
        train(config)
    assert set(killer.killed) == {"RolloutWorker.generate_groups", "JudgeWorker.judge_groups"}, killer.killed
    err = capfd.readouterr().err
    assert "rollout-0 died during 'generate_groups'" in err
    assert "judge engine 0 died during 'judge_groups'" in err

    metrics = read_metrics(run_dir)
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    for m in metrics:
        assert m["judge.candidates"] == prompts_per_iteration * group_size  # every group scored, once
        assert m["judge.invalid_share"] == 0.0
        assert m["learner.engine_gap_max_abs"] < 0.05  # the rollout engine sampled from the current weights
    for line in (run_dir / "prompt_ids.jsonl").read_text().splitlines():
        prompt_ids = json.loads(line)["prompt_ids"]
        assert len(prompt_ids) == len(set(prompt_ids)) == prompts_per_iteration


def test_call_engines_gives_up_on_a_job_past_its_deadline(ray_local):
    """A job still running at ``timeout_s`` comes back as TIMED_OUT (the judge leaves its groups
    invalid); the others come back as usual, in order."""
    import time

    import ray

    from dynalign.engine import TIMED_OUT, call_engines

    @ray.remote(num_cpus=0)
    class Sleeper:
        def nap(self, seconds: float) -> float:
            time.sleep(seconds)
            return seconds

    quick, slow = Sleeper.remote(), Sleeper.remote()
    ray.get([quick.nap.remote(0), slow.nap.remote(0)])  # both actors up before the clock starts
    started = time.monotonic()
    results = call_engines([(quick, "quick", "nap", (0.1,)), (slow, "slow", "nap", (30.0,))], timeout_s=3.0)
    assert results == [0.1, TIMED_OUT]
    assert time.monotonic() - started < 20
    ray.kill(slow)
