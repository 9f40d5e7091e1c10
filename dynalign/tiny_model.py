"""A tiny random-init causal LM and tokenizer, built locally (no model hub).

vLLM on CPU serves it: head_dim must be 64 (16 is unsupported by the CPU attention kernels).
Tests and the smoke run use it; the text it writes is gibberish, the pipeline around it is real.
"""

from __future__ import annotations

import os
from pathlib import Path

from dynalign.files import atomic_directory

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]

# Enough text for a byte-level BPE to learn some merges; digits and "Score:" appear so judge
# prompts tokenise sensibly.
TRAINING_TEXT = [
    "Collective agency is the capacity of a group to act together toward shared goals.",
    "Knowledge, benevolence, power and vitality are the four pillars of collective agency.",
    "A helpful answer explains its reasoning, respects people and grows what communities can do.",
    "Rate the answer on a scale from 0 to 5. Score: 0 1 2 3 4 5",
    "The assistant writes a short, honest and kind reply to the user's question.",
    "Communities share knowledge, care for each other, build capacity and stay alive and well.",
]


def build_tokenizer(vocab_size: int = 320):
    """Byte-level BPE trained on a few sentences, wrapped as a fast HF tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token=None,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, seed: int = 0, hidden_size: int = 128, num_layers: int = 2, init_std: float = 0.02):
    """Random-init Llama: head_dim 64 (2 heads), one KV head, untied embeddings, weights of std
    ``init_std`` (transformers' default 0.02)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        torch_dtype="float32",
        initializer_range=init_std,
    )
    return LlamaForCausalLM(config)


def make_tiny_model(path: str | os.PathLike, seed: int = 0, overwrite: bool = False, init_std: float = 0.02) -> Path:
    """Write model + tokenizer to ``path`` atomically (a temp dir renamed into place). ``init_std``:
    see ``build_model`` (the LoRA learning test wants a larger one)."""
    target = Path(path)
    if target.exists():
        if (target / "config.json").is_file():
            if not overwrite:
                return target
        elif not overwrite and target.is_dir() and any(target.iterdir()):  # not a model: only on request
            from dynalign.config import ConfigError

            raise ConfigError(f"make-tiny-model {target}: the directory holds files but no model; "
                              "choose a new or empty directory, or give --overwrite")
    with atomic_directory(target) as staging:  # an earlier one is replaced once the new one is whole
        tokenizer = build_tokenizer()
        model = build_model(tokenizer, seed=seed, init_std=init_std)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target
