"""LoRA (``learner.lora.rank > 0``): options and refusals, the PEFT adapter on real DeepSpeed ranks
(every ZeRO stage), what leaves the learner (the adapter; the merged model), and the saved adapter
and merged policy loading in transformers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dynalign.config import ConfigError
from tests.conftest import EXACT_ENGINE, tiny_config
from tests.test_learner_step import _samples


def test_rank_zero_is_full_fine_tuning_and_the_default(tiny_model_path, tmp_path):
    from dynalign.engine import EngineSpec
    from dynalign.sync_backend import choose_backend

    config = tiny_config(tiny_model_path, tmp_path / "run")
    assert config.learner.lora.rank == 0 and not config.learner.lora.enabled
    assert EngineSpec.rollout(config).lora_rank == 0
    lora = tiny_config(tiny_model_path, tmp_path / "run", "learner.lora.rank=4", "learner.lora.alpha=8")
    assert lora.learner.lora.enabled and lora.learner.lora.engine_max_rank == 8  # vLLM's next slot size
    assert EngineSpec.rollout(lora).lora_rank == 8
    assert EngineSpec.other(lora, tiny_model_path, 256).lora_rank == 0  # never synced: no adapter
    # Engines on whole GPUs would take NCCL for full weights; an adapter goes through the object store.
    gpus = ("rollout.num_gpus_per_worker=1", "learner.num_gpus_per_rank=1")
    assert choose_backend(tiny_config(tiny_model_path, tmp_path / "run", *gpus)) == "nccl"
    assert choose_backend(tiny_config(tiny_model_path, tmp_path / "run", *gpus, "learner.lora.rank=16")) == "reload"


@pytest.mark.parametrize("overrides, message", [
    (["learner.lora.rank=-1"], r"^learner.lora.rank = -1 \(from command line\) is out of range; allowed: >= 0 and <= 512$"),
    (["learner.lora.rank=8", "learner.lora.target_modules=[q_proj,lm_head]"],
     r"^learner.lora.target_modules = \['q_proj', 'lm_head'\]: 'lm_head' cannot carry an adapter the engines serve; "
     r"choose from q_proj, k_proj"),
    (["learner.lora.rank=8", "learner.lora.target_modules=[]"], r"^learner.lora.target_modules = \[\]: give a non-empty list"),
    (["learner.lora.rank=8", "learner.lora.alpha=0"], r"^learner.lora.alpha = 0 .* out of range"),
    (["learner.lora.rank=8", "sync.backend=nccl"],
     r"^sync.backend = nccl with learner.lora.rank = 8: .*use sync.backend=auto or reload$"),
])
def test_unsupported_lora_settings_are_refused_in_one_line(tiny_model_path, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        tiny_config(tiny_model_path, tmp_path / "run", *overrides)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_lora_trains_only_the_adapter_on_every_zero_stage(process_group, tiny_model_path, tmp_path):
    """ZeRO 0 and 3 (a lone rank runs 1 and 2 as 0): the base weights stay frozen and only the
    adapter moves; both stages take the same step; the export holds only the adapter, under PEFT's
    names; the saved adapter (PEFT format) and the merged model (Hugging Face format) give the
    learner's own log-probs in transformers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dynalign import lora
    from dynalign.learner import PolicyTrainer

    overrides = ("learner.num_ranks=1", "learner.lr=5e-2", "learner.micro_batch_size=2", "data.prompts_per_iteration=2",
                 "rollout.group_size=2", "learner.lora.rank=4", "learner.lora.alpha=8", "sync.bucket_mb=0.01")
    steps = {}
    for stage in (0, 3):
        config = tiny_config(tiny_model_path, tmp_path / f"run{stage}", *overrides, f"learner.zero_stage={stage}")
        trainer = PolicyTrainer(config, rank=0, world_size=1)
        module = trainer.engine.module
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_" in n for n in trainable)
        base_before = {n: _full(p) for n, p in module.named_parameters() if ".lora_" not in n}
        samples = _samples(trainer.tokenizer, 4)
        steps[stage] = trainer.train_step(samples)
        assert all(torch.equal(_full(p), base_before[n]) for n, p in module.named_parameters() if ".lora_" not in n)
        adapter = {k: v for bucket in trainer.weight_buckets(2**20, torch.float32, adapter=True) for k, v in bucket.items()}
        assert lora.engine_peft_config(config.learner.lora) == {"r": 4, "lora_alpha": 8.0, "bias": "none",
                                                                "target_modules": sorted(config.learner.lora.target_modules)}
        assert adapter and all(k.startswith("base_model.model.model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
                               for k in adapter)
        assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # the step moved B off zero
        trainer.save_adapter(str(tmp_path / f"adapter{stage}"))
        trainer.save_policy(str(tmp_path / f"merged{stage}"), "float32")
        # After the saves: a ZeRO-3 forward leaves prefetched parameters in flight, which a gather then trips on.
        learner_logprobs = trainer.logprobs(samples)
        for model in (PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path),
                                                str(tmp_path / f"adapter{stage}")),
                      AutoModelForCausalLM.from_pretrained(tmp_path / f"merged{stage}")):
            gap = _max_gap(model, samples, learner_logprobs)
            assert gap < 1e-4, gap
    assert steps[3]["loss"] == pytest.approx(steps[0]["loss"], rel=1e-5, abs=1e-7)
    assert steps[3]["grad_norm"] == pytest.approx(steps[0]["grad_norm"], rel=1e-4)


def _full(param) -> torch.Tensor:
    """A parameter's full value (gathered under ZeRO-3)."""
    import deepspeed

    if hasattr(param, "ds_tensor"):
        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().clone()
    return param.detach().clone()


@torch.no_grad()
def _max_gap(model, samples, expected) -> float:
    gap = 0.0
    for sample, want in zip(samples, expected, strict=True):
        ids = torch.tensor([sample.prompt_token_ids + sample.completion_token_ids])
        logits = model(input_ids=ids).logits[0, len(sample.prompt_token_ids) - 1:-1]
        got = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(sample.completion_token_ids)[:, None])[:, 0]
        gap = max(gap, float((got - torch.tensor(want)).abs().max()))
    return gap


@pytest.mark.slow
def test_adapter_sync_reaches_rollout_and_shared_judge(ray_local, tiny_model_std01_path, tmp_path):
    """One stack (a LoRA-enabled rollout engine, the policy judging on it, two learner ranks):
    - after a step only the adapter moves (through the object store, built in the engine from
      memory) as a new version, the old one unloaded, the base weights untouched; vLLM's sampling
      log-probs then match the learner's within 0.05, and with the sync skipped they do not;
    - self-rewarding stays self-rewarding: the shared judge scores with the adapter of the last
      sync. Its scores equal those of a judge engine serving the merged policy the learner saved
      (which vLLM loads like any model), and differ from the base model's.
    The std-0.1 tiny model: on the 0.02 one the adapter moved the judge's scores by 0.02 only."""
    import copy

    import ray

    from dynalign.data import load_prompts
    from dynalign.driver import absolute_paths, to_samples
    from dynalign.judge import make_judge
    from dynalign.learner import LearnerGroup
    from dynalign.rollout import RolloutPool
    from dynalign.weight_sync import WeightSync
    from tests.test_loop import _max_logprob_gap, _with_zero_rewards

    overrides = ("learner.lr=5e-2", "data.prompts_per_iteration=4", "rollout.group_size=4", "learner.lora.rank=8",
                 "learner.lora.alpha=32", *EXACT_ENGINE)
    config = absolute_paths(tiny_config(tiny_model_std01_path, tmp_path / "run", *overrides))
    assert config.judge.uses_shared_engines and config.judge.mode == "logprob"
    prompts = load_prompts(config)
    rollout = RolloutPool(config)
    judge = make_judge(config, rollout)
    learner = LearnerGroup(config, tmp_path / "train")
    sync = WeightSync(config, rollout.synced)
    engine = rollout.workers[0]
    merged_judge = None
    try:
        groups = rollout.generate(prompts.take(4), iteration=0)

        def scores(with_judge) -> list[float]:
            judged = copy.deepcopy(groups)
            with_judge.score(judged)
            return [r for g in judged for r in g.rewards]

        base_scores = scores(judge)
        for group in groups:  # alternate signs: a real, non-zero update regardless of any reward
            group.rewards = [float(j % 2) for j in range(len(group.candidates))]
        samples, _ = to_samples(groups, config)
        initial_gap = _max_logprob_gap(learner, samples)  # a fresh adapter (B = 0) is the base model
        learner.train_step(samples)
        stale_samples, _ = to_samples(_with_zero_rewards(rollout.generate(prompts.take(4), iteration=1)), config)
        stale_gap = _max_logprob_gap(learner, stale_samples)

        checksum = ray.get(engine.weight_checksum.remote())
        stats = sync.sync(learner, version=1)
        assert ray.get(engine.adapter_ids.remote()) == [2]  # version 1 is adapter id 2
        fresh_samples, _ = to_samples(_with_zero_rewards(rollout.generate(prompts.take(4), iteration=2)), config)
        fresh_gap = _max_logprob_gap(learner, fresh_samples)
        learner.train_step(samples)
        second = sync.sync(learner, version=2)
        assert ray.get(engine.adapter_ids.remote()) == [3]  # the old version is unloaded
        assert ray.get(engine.weight_checksum.remote()) == checksum  # base weights untouched: only the adapter moved
        final_samples, _ = to_samples(_with_zero_rewards(rollout.generate(prompts.take(4), iteration=3)), config)
        final_gap = _max_logprob_gap(learner, final_samples)
        print(f"LoRA max |engine - learner| log-prob: initial {initial_gap:.2e}, stale (sync skipped) {stale_gap:.4f}, "
              f"after sync {fresh_gap:.2e}, after a second sync {final_gap:.2e}; adapter sync "
              f"{stats['sync_seconds']:.3f} s, {stats['sync_bytes']:.0f} B ({config.engine_dtype} engine)")
        assert initial_gap < 0.05 and fresh_gap < 0.05 and final_gap < 0.05
        assert stale_gap > 0.05, "without a sync the engine should still sample from the old adapter"
        full_bytes = sum(v.numel() for v in _model_tensors(tiny_model_std01_path)) * (4 if config.engine_dtype == "float32" else 2)
        assert 0 < stats["sync_bytes"] == second["sync_bytes"] < full_bytes / 2

        adapter_scores = scores(judge)
        learner.save_policy(tmp_path / "merged", "float32")
        merged_config = absolute_paths(tiny_config(tiny_model_std01_path, tmp_path / "run2", *overrides,
                                                   "judge.kind=external_vllm", f"judge.model_path={tmp_path / 'merged'}"))
        merged_judge = make_judge(merged_config)
        merged_scores = scores(merged_judge)
        to_base = max(abs(a - b) for a, b in zip(adapter_scores, base_scores))
        to_merged = max(abs(a - b) for a, b in zip(adapter_scores, merged_scores))
        print(f"shared judge with the adapter vs the merged policy: max score gap {to_merged:.2e}; "
              f"vs the base model: {to_base:.4f} (0-5 scale)")
        assert to_merged < 0.05 < to_base
    finally:
        if merged_judge is not None:
            merged_judge.shutdown()
        learner.shutdown()
        rollout.shutdown()


def _model_tensors(path: str) -> list[torch.Tensor]:
    from pathlib import Path

    from safetensors.torch import load_file

    return [t for file in Path(path).glob("*.safetensors") for t in load_file(str(file)).values()]


@pytest.mark.slow
@pytest.mark.xdist_group("rule_learning_lora")  # with pytest -n: with test_loop's LoRA learning test, one run
def test_lora_resume_is_exact(rule_learning_run_lora, tmp_path):
    """A LoRA run's checkpoints hold the adapter (PEFT format; the DeepSpeed state holds it and its
    optimizer state), not a merged model. A copy of the shared learning run resumed from its
    iteration-5 checkpoint replays the last two iterations (the metrics log cut back to the
    checkpoint) and ends with the very adapter and rewards of the run that was not stopped."""
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file

    from dynalign.driver import train
    from dynalign.metrics import read_metrics

    config, _ = rule_learning_run_lora
    straight = Path(config.run_dir)
    split = tmp_path / "split"
    # Not the final policy and adapter (the resumed run writes its own), nor Ray Train's storage.
    shutil.copytree(straight, split, symlinks=True,
                    ignore=lambda where, names: {"ray_train", "policy", "adapter"} & set(names) if where == str(straight) else ())
    assert not (split / "adapter").exists()
    checkpoint = split / "checkpoints" / "iter_000005"
    assert (checkpoint / "adapter" / "adapter_model.safetensors").is_file() and not (checkpoint / "policy").exists()
    train(dataclasses.replace(config, run_dir=str(split)), resume=str(checkpoint))
    rewards = {name: [m["reward_mean"] for m in read_metrics(path)] for name, path in (("straight", straight), ("split", split))}
    adapters = {name: load_file(str(path / "adapter" / "adapter_model.safetensors"))
                for name, path in (("straight", straight), ("split", split))}
    moved = max(float(t.abs().max()) for name, t in adapters["straight"].items() if "lora_B" in name)
    print(f"LoRA resume: rewards {rewards}; largest |lora_B| {moved:.4f}")
    assert rewards["split"] == rewards["straight"] and len(rewards["straight"]) == config.iterations
    assert moved > 0 and adapters["split"].keys() == adapters["straight"].keys()
    for name, tensor in adapters["straight"].items():
        assert torch.equal(adapters["split"][name], tensor), name


def test_export_merges_an_adapter_into_its_base(tiny_model_path, tmp_path, capsys):
    """`dynalign export --merge ADAPTER OUT`: a PEFT adapter (as a LoRA run saves it) merged into its
    base gives the adapter's log-probs in transformers; a directory without an adapter is refused
    in one line."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from dynalign import lora
    from dynalign.cli import main
    from dynalign.config import LoraConfig

    config = LoraConfig(rank=4, alpha=8.0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_path), lora.peft_config(config))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    tensors = {name: t.detach() for name, t, _ in lora.adapter_entries(model)}
    lora.write_adapter(tmp_path / "adapter", tensors, config, tiny_model_path)
    assert main(["export", "--merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    assert "merged model written" in capsys.readouterr().out
    ids = torch.tensor([[1, 5, 9, 40, 77, 3]])
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), str(tmp_path / "adapter"))
    with torch.no_grad():
        want = adapter(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_path)(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-4 < (base - want).abs().max()
    capsys.readouterr()  # drop transformers' loading output
    assert main(["export", "--merge", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no adapter_config.json there" in err[0]
