"""The Dynamic Alignment loop on the real stack: Ray actors with vLLM (CPU), DeepSpeed ranks under
Ray Train, in-place weight sync. Slow: each test starts engines and learner ranks."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config

pytestmark = pytest.mark.slow


def _max_logprob_gap(learner, samples) -> float:
    learner_logprobs = learner.logprobs(samples)
    return max(abs(engine - ours)
               for sample, per_token in zip(samples, learner_logprobs, strict=True)
               for engine, ours in zip(sample.engine_logprobs, per_token, strict=True))


def test_sync_makes_engine_logprobs_match_learner(ray_local, tiny_model_path, tmp_path):
    """After a sync vLLM's sampling log-probs match the learner's within 0.05; without it they do not."""
    from dynalign.data import load_prompts
    from dynalign.driver import absolute_paths, to_samples
    from dynalign.learner import LearnerError, LearnerGroup
    from dynalign.rollout import RolloutPool
    from dynalign.weight_sync import WeightSync, WeightSyncError

    config = absolute_paths(tiny_config(tiny_model_path, tmp_path / "run", "judge.kind=rule", "learner.lr=1e-2",
                                        "data.prompts_per_iteration=4", "rollout.group_size=4", "sync.bucket_mb=0.1"))
    prompts = load_prompts(config)
    rollout = RolloutPool(config)
    learner = LearnerGroup(config, tmp_path / "train")
    sync = WeightSync(config, rollout.synced)
    assert rollout.synced.names == ["rollout-0"]
    try:
        groups = rollout.generate(prompts.take(4), iteration=0)
        for group in groups:  # alternate signs: a real, non-zero update regardless of any reward
            group.rewards = [float(j % 2) for j in range(len(group.candidates))]
        samples, _ = to_samples(groups, config)
        initial_gap = _max_logprob_gap(learner, samples)
        metrics = learner.train_step(samples)
        assert metrics["first_microstep_ratio_max_dev"] < 1e-6

        checksum_before = rollout.workers[0].weight_checksum.remote()
        stale_samples, _ = to_samples(_with_zero_rewards(rollout.generate(prompts.take(4), iteration=1)), config)
        stale_gap = _max_logprob_gap(learner, stale_samples)

        stats = sync.sync(learner, version=1)
        checksum_after = rollout.workers[0].weight_checksum.remote()
        fresh_samples, _ = to_samples(_with_zero_rewards(rollout.generate(prompts.take(4), iteration=2)), config)
        fresh_gap = _max_logprob_gap(learner, fresh_samples)
        print(f"max |engine - learner| log-prob: initial {initial_gap:.4f}, stale {stale_gap:.4f}, "
              f"after sync {fresh_gap:.4f}; sync {stats['sync_seconds']:.3f} s, {stats['sync_bytes']:.0f} B")
        assert initial_gap < 0.05
        assert fresh_gap < 0.05
        assert stale_gap > 0.05, "without a sync the engine should still sample from the old weights"
        import ray
        assert ray.get(checksum_before) != ray.get(checksum_after)
        assert stats["sync_bytes"] > 0
        assert stats["sync_buckets"] > 1  # 0.1 MiB buckets for a ~0.75 MB model

        # A sync that cannot finish in time fails with the engine's name instead of hanging.
        config.sync.timeout_s = 1e-4
        with pytest.raises(WeightSyncError, match=r"rollout-0 did not finish within sync.timeout_s"):
            WeightSync(config, rollout.synced).sync(learner, version=2)

        # A NaN loss skips the step on every rank (weights untouched); K in a row stop the run.
        poisoned = [dataclasses.replace(s, advantage=float("nan")) for s in fresh_samples]
        before = learner.logprobs(fresh_samples)
        for _ in range(config.learner.max_nonfinite_steps - 1):
            assert learner.train_step(poisoned)["skipped_nonfinite"] == 1.0
        assert learner.logprobs(fresh_samples) == before
        with pytest.raises(LearnerError, match=r"NaN or infinite in 3 steps in a row \(learner.max_nonfinite_steps = 3\)"):
            learner.train_step(poisoned)

        # A finite loss can still overflow the gradient norm (advantages of 1e30): the run stops at
        # once, in one line, instead of stepping on and saving a broken policy.
        overflowing = [dataclasses.replace(s, advantage=1e30) for s in fresh_samples]
        with pytest.raises(LearnerError, match=r"^the weights or the gradient norm \(grad norm \S+\) went NaN or infinite"):
            learner.train_step(overflowing)
    finally:
        learner.shutdown()
        rollout.shutdown()


def _with_zero_rewards(groups):
    for group in groups:
        group.rewards = [0.0] * len(group.candidates)
    return groups


def _check_rule_learning(config, summary, what: str, max_staleness: int = 0) -> list[dict]:
    """The learning run's metrics, checked: 8 iterations, the last two iterations' mean reward at
    least double the first's, ratio 1 on each first micro-step, every sync landed (the engines
    generated each iteration's groups with the weights they should hold: one version behind the
    learner's from iteration 1 on when one step off)."""
    from dynalign.metrics import read_metrics

    metrics = read_metrics(config.run_dir)
    rewards = [m["reward_mean"] for m in metrics]
    first, last_two = rewards[0], sum(rewards[-2:]) / 2
    print(f"{what} rule reward: first iteration {first:.4f}, mean of last two {last_two:.4f} (all: "
          f"{', '.join(f'{r:.4f}' for r in rewards)}); sync {metrics[-1]['sync_bytes']:.0f} B")
    assert len(metrics) == 8
    assert last_two >= 2 * first > 0
    for m in metrics:
        assert m["learner.first_microstep_ratio_max_dev"] < 1e-6
        assert m["staleness.max"] == m["staleness.mean"] == min(m["iteration"], max_staleness)
        assert m["version.generation_min"] == m["iteration"] - m["staleness.max"] and m["staleness.dropped"] == 0
        if m["staleness.max"] == 0:
            assert m["learner.engine_gap_max_abs"] < 0.05  # the engine sampled from the learner's weights
        assert m["sync_bytes"] > 0
    assert summary["reward_mean_per_iteration"] == rewards
    return metrics


@pytest.mark.xdist_group("rule_learning")  # with pytest -n: the shared run is trained once
def test_rule_reward_learning_doubles(rule_learning_run):
    """GRPO learns: with a rule reward and fixed seeds, the last two iterations' mean reward is at
    least double the first iteration's. Also: ratio 1 on each iteration's first micro-step."""
    config, summary = rule_learning_run
    _check_rule_learning(config, summary, "full fine-tuning")
    assert list((Path(config.run_dir) / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.xdist_group("rule_learning_stale")  # with pytest -n: with the resume test below, one run
def test_rule_reward_learning_doubles_one_step_off(rule_learning_run_stale):
    """The learning test one step off (rollout.max_staleness=1): from iteration 1 on the learner
    trains on groups the engines sampled with the previous weights while it stepped, and the
    truncated IS weights against the engines' log-probs correct for it. The reward still at least
    doubles, and the stale samples are measurably off the learner's policy."""
    config, summary = rule_learning_run_stale
    metrics = _check_rule_learning(config, summary, "one step off (max_staleness=1)", max_staleness=1)
    gaps = [m["learner.engine_gap_max_abs"] for m in metrics]
    print("engine-learner log-prob gap per iteration: " + ", ".join(f"{g:.3f}" for g in gaps) +
          "; IS weight mean/min: " + ", ".join(f"{m['learner.is_weight_mean']:.3f}/{m['learner.is_weight_min']:.3f}"
                                                for m in metrics))
    assert max(gaps[1:]) > 2 * gaps[0]  # one version old: the IS correction has something to correct
    assert all("time.generate" in m and "time.judge" in m for m in metrics)  # timed where they ran: ahead


@pytest.mark.xdist_group("rule_learning_stale")
def test_one_step_off_resume_is_exact(rule_learning_run_stale, tmp_path):
    """A copy of the one-step-off learning run resumed from its iteration-5 checkpoint, written
    while iteration 6's groups were already generated and judged (the checkpoint keeps them),
    replays iterations 6 and 7 and ends with the very rewards and final weights of the run that
    was not stopped."""
    import shutil

    from safetensors.torch import load_file

    from dynalign.driver import train
    from dynalign.files import read_jsonl
    from dynalign.metrics import read_metrics
    from dynalign.overlap import AHEAD_FILE

    config, _ = rule_learning_run_stale
    straight = Path(config.run_dir)
    split = tmp_path / "split"
    shutil.copytree(straight, split, symlinks=True,
                    ignore=lambda where, names: {"ray_train", "policy"} & set(names) if where == str(straight) else ())
    checkpoint = split / "checkpoints" / "iter_000005"
    *groups, tail = read_jsonl(checkpoint / AHEAD_FILE)
    assert tail["iteration"] == 6 and len(groups) == config.data.prompts_per_iteration
    assert {r["group"]["generation_version"] for r in groups} == {5}  # sampled by the weights of iteration 5's step
    assert AHEAD_FILE in json.loads((checkpoint / "manifest.json").read_text())["files"]
    train(dataclasses.replace(config, run_dir=str(split)), resume=str(checkpoint))
    runs = {"straight": straight, "split": split}
    metrics = {name: read_metrics(path) for name, path in runs.items()}
    rewards = {name: [m["reward_mean"] for m in ms] for name, ms in metrics.items()}
    print(f"one-step-off resume: rewards {rewards}")
    assert rewards["split"] == rewards["straight"] and len(rewards["straight"]) == config.iterations
    for key in ("learner.loss", "learner.is_weight_mean", "staleness.mean", "version.generation_min"):
        assert [m[key] for m in metrics["split"]] == [m[key] for m in metrics["straight"]], key
    weights = {name: {k: t for file in sorted((path / "policy").glob("*.safetensors")) for k, t in load_file(str(file)).items()}
               for name, path in runs.items()}
    assert weights["straight"]
    assert weights["split"].keys() == weights["straight"].keys()
    for name, tensor in weights["straight"].items():
        assert torch.equal(weights["split"][name], tensor), name


@pytest.mark.xdist_group("rule_learning_lora")  # with pytest -n: with test_lora's resume test, one run
def test_rule_reward_learning_doubles_with_lora(rule_learning_run_lora):
    """The learning test with a LoRA adapter (rank 16) in place of full fine-tuning: only the adapter
    moves to the engine each iteration, and the reward still at least doubles. The final policy is
    saved both ways: the adapter (PEFT) and the merged model (Hugging Face)."""
    from tests.test_lora import _model_tensors

    config, summary = rule_learning_run_lora
    metrics = _check_rule_learning(config, summary, "LoRA")
    itemsize = 4 if config.engine_dtype == "float32" else 2
    full_bytes = sum(t.numel() for t in _model_tensors(config.model.path)) * itemsize  # a full sync's payload
    assert all(m["sync_bytes"] < full_bytes / 4 for m in metrics)  # the adapter alone
    run_dir = Path(config.run_dir)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file() and (run_dir / "policy" / "config.json").is_file()


def test_self_rewarding_smoke_through_cli(ray_local, tiny_model_path, tmp_path, capsys, monkeypatch):
    """The smoke job, as `dynalign train` runs it: the policy judges itself (logprob mode, on the
    shared rollout engine), two iterations one step off (rollout.max_staleness=1), the final
    policy saved in Hugging Face format. No judge-only engine is started, the sync targets the
    rollout engine only, and the judge metrics reach metrics.jsonl and TensorBoard.
    With generation on: each iteration the policy's engine writes fresh prompts (iteration 1's
    while the learner steps on iteration 0), which are filtered, stored and trained on (topped up
    from the prompts file when too few survive)."""
    from ray.util.state import list_actors
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    from dynalign import driver
    from dynalign.cli import main
    from dynalign.prompt_store import PromptStore
    from tests.conftest import REPO

    synced = {}

    class SpySync(driver.WeightSync):
        def __init__(self, config, engines):
            synced["names"] = list(engines.names)
            super().__init__(config, engines)
    monkeypatch.setattr(driver, "WeightSync", SpySync)

    def judge_actors():
        return len(list_actors(address=ray_local.get_runtime_context().gcs_address,
                               filters=[("class_name", "=", "JudgeWorker")], limit=1000))
    judge_actors_before = judge_actors()

    run_dir = tmp_path / "smoke"
    config = tiny_config(tiny_model_path, run_dir)
    assert config.judge.kind == "policy" and config.judge.engine == "shared" and config.judge.mode == "logprob"
    overrides = [f"model.path={config.model.path}", f"run_dir={run_dir}", f"data.prompts_path={config.data.prompts_path}",
                 f"judge.value_spec={config.judge.value_spec}", "logging.progress=false", "rollout.max_staleness=1",
                 "rollout.max_model_len=1024", "generation.enabled=true", "generation.requests_per_iteration=4",
                 "generation.prompts_per_request=4", "generation.examples_per_request=2",
                 "generation.max_new_tokens=48", "generation.min_words=1"]
    assert main(["train", "--config", str(REPO / "configs/smoke.yaml"), *overrides]) == 0
    assert judge_actors() == judge_actors_before
    assert synced["names"] == ["rollout-0"]
    out = capsys.readouterr().out
    assert "dynalign run summary" in out
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1]
    for m in metrics:
        assert 0.0 <= m["reward_min"] <= m["reward_max"] <= 5.0
        assert m["judge.invalid_share"] == 0.0  # logprob scoring never fails to parse
        for phase in ("generate", "judge", "learn", "sync"):
            assert m[f"time.{phase}"] > 0
    # One step off: iteration 1's groups were sampled and judged during iteration 0's learner step,
    # by version 0 on the shared engine (the judge rule: the weights that generated a group judge it).
    assert [m["staleness.max"] for m in metrics] == [0.0, 1.0]
    assert all(m["version.judge_mismatch"] == 0 and m["version.judge_min"] == 0 for m in metrics)
    records = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {r["iteration"] for r in records} == {0, 1}
    assert all(r["generation_version"] == r["judge_version"] == 0 for r in records)
    store = PromptStore(run_dir / "prompts")
    assert store.iterations() == [0, 1]
    trained = [json.loads(line) for line in (run_dir / "prompt_ids.jsonl").read_text().splitlines()]
    for m, record in zip(metrics, trained, strict=True):
        print(f"iteration {m['iteration']}: kept {m['prompts.kept']:.0f} of {m['prompts.candidates']:.0f} generated "
              f"prompts, topped up {m['prompts.topped_up']:.0f}")
        assert m["prompts.requests"] == 4 and m["prompts.requests_failed"] == 0
        assert m["prompts.kept"] + m["prompts.topped_up"] >= config.data.prompts_per_iteration
        generated = {r["id"] for r in store.load(m["iteration"])}
        used = [pid for pid in record["prompt_ids"] if pid.startswith("gen-")]
        assert set(used) <= generated and (used or m["prompts.kept"] == 0)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "policy")
    assert model.config.vocab_size > 0
    assert json.loads((run_dir / "summary.json").read_text())["iterations"] == 2

    keys = ["judge.parse_failure_rate", "judge.invalid_rate", "judge.within_group_std", "judge.tied_group_share",
            "judge.length_spearman", "judge.repeat_exact_agreement", "judge.score_hist.0", "judge.score_hist.5",
            "judge.judgements", "judge.errors"]
    for m in metrics:
        for key in keys:
            assert key in m, key
        assert m["judge.invalid_rate"] == 0.0 and m["judge.parse_failure_rate"] == 0.0
        assert sum(m[f"judge.score_hist.{v}"] for v in range(6)) == m["judge.candidates"]
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("judge/parse_failure_rate", "judge/within_group_std", "judge/score_hist.3", "judge/invalid_rate"):
        assert tag in tags["scalars"], tag
    assert "judge/scores" in tags["histograms"]
    print("judge metrics, last iteration: " + ", ".join(f"{k} {metrics[-1][k]:.3f}" for k in keys))

    # Nothing lost: failing runs into the same run_dir (a wrong prompts file; no --resume or
    # --overwrite) are refused in one line and leave the finished run as it was.
    from tests.test_errors import _snapshot
    before = _snapshot(run_dir)
    capsys.readouterr()  # drop what loading the policy above printed
    smoke = str(REPO / "configs/smoke.yaml")
    assert main(["train", "--config", smoke, *overrides, f"data.prompts_path={run_dir / 'typo.jsonl'}"]) == 2
    assert main(["train", "--config", smoke, *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "typo.jsonl': no such file" in err[0] and "holds a run" in err[1]
    assert _snapshot(run_dir) == before
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report" / "index.html").read_text()
    assert "<td>iterations logged</td><td>2</td>" in page


def test_all_groups_tied_warns_and_the_update_is_a_no_op(ray_local, tiny_model_path, tmp_path, capfd):
    """Every group's rewards tie (one-token answers under the length rule all score 1): the driver
    drops and refills them for max_refill_rounds, then warns in one line, logs tied_group_share = 1
    and trains on zero advantages (no gradient), and the run goes on to the next iteration. Its one
    learner rank runs as many torch threads as the machine has cores (learner.threads)."""
    from dynalign.driver import train
    from dynalign.metrics import read_metrics

    config = tiny_config(tiny_model_path, tmp_path / "run", "judge.kind=rule", "judge.rule=length",
                         "rollout.max_new_tokens=1", "iterations=2", "learner.max_refill_rounds=1",
                         "data.prompts_per_iteration=4", "rollout.group_size=4", "logging.backends=[]",
                         "learner.num_ranks=1")
    train(config)
    err = capfd.readouterr().err
    for iteration in (0, 1):
        assert (f"dynalign: warning: iteration {iteration}: all 8 groups have zero reward variance after 2 round(s); "
                "no learning signal") in err
    metrics = read_metrics(config.run_dir)
    assert [m["iteration"] for m in metrics] == [0, 1]
    for m in metrics:
        assert m["tied_group_share"] == 1.0 and m["generation_rounds"] == 2.0
        assert m["reward_min"] == m["reward_max"] == 1.0
        assert m["learner.grad_norm"] == 0.0  # zero advantages: nothing to learn
        assert m["learner.skipped_nonfinite"] == 0.0
        assert m["learner.threads"] == len(os.sched_getaffinity(0))  # one rank uses every core, not 1 of 2
