"""The policy (final and in each checkpoint) is saved in the model's own dtype
(``checkpoint.policy_dtype=auto``, read from its config.json) or in the one configured, streamed
one bucket (one safetensors shard) at a time."""

from __future__ import annotations

import json

import pytest
import torch

from dynalign.checkpoint import cast_floating, policy_dtype, write_policy
from dynalign.config import ConfigError, load_config


@pytest.mark.parametrize("entry, expected", [
    ({"dtype": "bfloat16"}, "bfloat16"),        # transformers >= 4.56 writes `dtype`
    ({"torch_dtype": "float16"}, "float16"),    # older configs: `torch_dtype`
    ({"torch_dtype": "float32"}, "float32"),
    ({}, "float32"),                            # none named: full precision
    ({"dtype": "int8"}, "float32"),             # not a floating dtype the policy can be saved in
])
def test_auto_policy_dtype_is_the_models_own(tmp_path, entry, expected):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **entry}))
    assert policy_dtype("auto", str(tmp_path)) == expected
    for option in ("float32", "bfloat16", "float16"):
        assert policy_dtype(option, str(tmp_path)) == option


def test_policy_dtype_option_is_checked():
    assert load_config(None, []).checkpoint.policy_dtype == "auto"
    assert load_config(None, ["checkpoint.policy_dtype=bfloat16"]).checkpoint.policy_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="checkpoint.policy_dtype = 'int8' .*must be one of auto, float32, bfloat16, float16"):
        load_config(None, ["checkpoint.policy_dtype=int8"])


def test_cast_floating_casts_weights_and_keeps_integer_tensors():
    state = {"weight": torch.randn(3, 4), "positions": torch.arange(4)}
    cast = cast_floating(state, torch.bfloat16)
    assert cast["weight"].dtype == torch.bfloat16 and torch.equal(cast["weight"], state["weight"].to(torch.bfloat16))
    assert cast["positions"].dtype == torch.int64 and torch.equal(cast["positions"], state["positions"])
    assert state["weight"].dtype == torch.float32  # the input is left as it was


@pytest.mark.parametrize("num_buckets", [1, 3])
def test_write_policy_saves_weights_and_config_in_the_dtype(tiny_model_path, tmp_path, num_buckets):
    """What rank 0 does with the gathered float32 buckets: a Hugging Face directory (one shard per
    bucket plus an index, or one model.safetensors) whose tensors and config.json are bfloat16,
    which transformers loads back as bfloat16; the live model keeps its float32 config."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    names = list(state)
    cuts = [names[i::num_buckets] for i in range(num_buckets)]
    consumed = []

    def buckets():
        for cut in cuts:
            consumed.append(len(cut))
            yield {name: state[name] for name in cut}

    write_policy(model, tokenizer, buckets(), num_buckets, tmp_path / "policy", "bfloat16")
    shards = sorted(p.name for p in (tmp_path / "policy").glob("*.safetensors"))
    assert len(shards) == num_buckets and consumed == [len(cut) for cut in cuts]
    assert (tmp_path / "policy" / "model.safetensors.index.json").is_file() == (num_buckets > 1)
    saved = {}
    for shard in shards:
        saved.update(load_file(str(tmp_path / "policy" / shard)))
    assert set(saved) == set(state)
    for name, tensor in saved.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, state[name].to(torch.bfloat16)), name
    assert json.loads((tmp_path / "policy" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "policy" / "tokenizer_config.json").is_file()
    assert (tmp_path / "policy" / "generation_config.json").is_file()
    assert str(model.config.dtype).removeprefix("torch.") == "float32"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "policy", dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    for name, param in reloaded.named_parameters():
        assert torch.equal(param, saved[name]), name


def test_checkpoints_save_the_policy_in_the_policy_dtype(tmp_path):
    """A checkpoint's policy/ is in checkpoint.policy_dtype (the learner's default: half the size of
    float32 for a bf16 model); exact resume reads the learner state, which keeps float32."""
    from dynalign import checkpoint

    asked = []

    class Learner:
        def save_checkpoint(self, directory):
            directory.mkdir(parents=True)
            (directory / "state.pt").write_bytes(b"s")

        def save_policy(self, directory, dtype_name=None):
            asked.append(dtype_name)
            directory.mkdir(parents=True)
            (directory / "model.safetensors").write_bytes(b"w")

    checkpoint.save(tmp_path / "run", 0, Learner(), {"prompts": {}}, keep_last=1)
    assert asked == [None]  # None: the learner's checkpoint.policy_dtype
