"""The final policy is saved in the model's own dtype (``checkpoint.policy_dtype=auto``, read from
its config.json) or in the one configured; checkpoints keep float32 (``checkpoint.save``)."""

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


def test_write_policy_saves_weights_and_config_in_the_dtype(tiny_model_path, tmp_path):
    """What rank 0 does with the gathered float32 weights: a Hugging Face directory whose tensors
    and config.json are bfloat16, which transformers loads back as bfloat16; the live model keeps
    its float32 config."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    state = {name: p.detach().clone() for name, p in model.named_parameters()}
    write_policy(model, tokenizer, state, tmp_path / "policy", "bfloat16")

    saved = load_file(str(tmp_path / "policy" / "model.safetensors"))
    assert set(saved) == set(state)
    for name, tensor in saved.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, state[name].to(torch.bfloat16)), name
    assert json.loads((tmp_path / "policy" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "policy" / "tokenizer_config.json").is_file()
    assert str(model.config.dtype).removeprefix("torch.") == "float32"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "policy", dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    for name, param in reloaded.named_parameters():
        assert torch.equal(param, saved[name]), name


def test_checkpoints_keep_full_precision(tmp_path):
    """A checkpoint's policy/ is float32 whatever checkpoint.policy_dtype says (exact resume reads
    the learner state, and a checkpoint is the run's full-precision record)."""
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
    assert asked == ["float32"]
