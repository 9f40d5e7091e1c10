"""The tiny local model: loads with transformers, has a working chat template, is written
atomically. That vLLM runs it is checked on the judge tests' shared engine (tests/test_judge.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynalign import cli
from dynalign.config import ConfigError
from dynalign.tiny_model import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """One tiny model per test session (seed 0); tests must not modify it."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def loaded(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, tokenizer


def file_state(path: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(path.iterdir())}


def test_loads_with_transformers(loaded):
    model, tokenizer = loaded
    config = model.config
    assert config.model_type == "llama"
    assert config.head_dim == 64  # vLLM's CPU attention kernels reject head_dim 16
    assert config.hidden_size == config.num_attention_heads * config.head_dim
    assert config.vocab_size == len(tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)


def test_forward_and_generate(loaded):
    import torch

    model, tokenizer = loaded
    ids = tokenizer("Collective agency grows knowledge.", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    out = model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4


def test_special_tokens_pad_and_eos(loaded):
    model, tokenizer = loaded
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    # Each special token is a single id and survives a round trip.
    for token in ("<|pad|>", "<|im_start|>", "<|im_end|>"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1


def test_chat_template(loaded):
    _, tokenizer = loaded
    messages = [{"role": "user", "content": "Rate the answer. Score: 3"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids)
    assert all(0 <= i < len(tokenizer) for i in ids)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nRate the answer. Score: 3<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(ids[0]) == "<|im_start|>"


def test_second_write_without_overwrite_leaves_files_untouched(tmp_path):
    target = make_tiny_model(tmp_path / "m", seed=0)
    before = file_state(target)
    assert make_tiny_model(target, seed=1) == target
    assert file_state(target) == before
    # Atomic write: no staging directories are left beside the model.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_overwrite_replaces_and_seed_changes_weights(tmp_path):
    from safetensors.torch import load_file

    target = make_tiny_model(tmp_path / "m", seed=0)
    first = load_file(target / "model.safetensors")
    make_tiny_model(target, seed=0, overwrite=True)
    again = load_file(target / "model.safetensors")
    make_tiny_model(target, seed=1, overwrite=True)
    other = load_file(target / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert first.keys() == again.keys() == other.keys()
    assert all((first[k] == again[k]).all() for k in first)  # same seed, same weights
    assert not (first[name] == other[name]).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_directory_without_a_model_is_kept_unless_overwrite(tmp_path):
    """A directory of other files is someone's data: refused in one line, replaced only on request."""
    target = tmp_path / "m"
    target.mkdir()
    (target / "notes.txt").write_text("not a model")
    with pytest.raises(ConfigError, match=r"the directory holds files but no model; .* or give --overwrite$"):
        make_tiny_model(target)
    assert (target / "notes.txt").read_text() == "not a model"
    make_tiny_model(target, overwrite=True)
    assert (target / "config.json").is_file() and not (target / "notes.txt").exists()


def test_cli_make_tiny_model(tmp_path, capsys):
    target = tmp_path / "nested" / "tiny"
    assert cli.main(["make-tiny-model", str(target), "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == f"{target}: tiny model written (seed 3)"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (target / name).is_file(), name
    before = file_state(target)

    assert cli.main(["make-tiny-model", str(target)]) == 0
    assert "kept" in capsys.readouterr().out
    assert file_state(target) == before

    assert cli.main(["make-tiny-model", str(target), "--overwrite"]) == 0
    assert "written" in capsys.readouterr().out


def test_cli_make_tiny_model_on_a_file_is_one_line_error(tmp_path, capsys):
    path = tmp_path / "a-file"
    path.write_text("x")
    assert cli.main(["make-tiny-model", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"dynalign: error: make-tiny-model {path}: exists and is not a directory"]
