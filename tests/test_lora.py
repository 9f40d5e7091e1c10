"""LoRA (``learner.lora.rank > 0``): options and refusals, the PEFT adapter on real DeepSpeed ranks
(every ZeRO stage), what leaves the learner (the adapter; the merged model), and the saved adapter
and merged policy loading in transformers."""

from __future__ import annotations

import pytest
import torch

from dynalign.config import ConfigError
from tests.conftest import tiny_config
from tests.test_learner_step import _samples, process_group  # noqa: F401 (the one-rank gloo group fixture)


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
def test_lora_trains_only_the_adapter_on_every_zero_stage(process_group, tiny_model_path, tmp_path):  # noqa: F811
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
