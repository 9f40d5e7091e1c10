"""The data that flows between roles in one iteration, and how the learner pads it into tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def chat_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The token ids an engine is given for a conversation: the chat template with the generation
    prompt. Every length check and every baseline that must match the engines uses this."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


@dataclass
class Candidate:
    """One sampled answer, as the rollout engine produced it."""

    token_ids: list[int]
    text: str
    logprobs: list[float]  # engine's sampling log-prob of each token in token_ids
    finish_reason: str


@dataclass
class Group:
    """A prompt and its G candidates; the judge fills ``rewards`` (NaN = invalid judgement)."""

    prompt_id: str
    prompt: str
    prompt_token_ids: list[int]
    candidates: list[Candidate]
    rewards: list[float] = field(default_factory=list)
    judge_info: dict = field(default_factory=dict)


@dataclass
class Sample:
    """One training sequence: prompt + candidate, with its advantage."""

    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    engine_logprobs: list[float]
    advantage: float


@dataclass
class PaddedBatch:
    """Right-padded tensors; position t of every [B, T-1] tensor scores token t+1."""

    input_ids: torch.Tensor        # [B, T]
    attention_mask: torch.Tensor   # [B, T]
    target_ids: torch.Tensor       # [B, T-1]
    completion_mask: torch.Tensor  # [B, T-1], 1 where the target is a completion token
    engine_logprobs: torch.Tensor  # [B, T-1], 0 outside the completion
    advantages: torch.Tensor       # [B]


def pad_samples(samples: list[Sample], pad_token_id: int) -> PaddedBatch:
    lengths = [len(s.prompt_token_ids) + len(s.completion_token_ids) for s in samples]
    width = max(lengths)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    completion_mask = torch.zeros((len(samples), width - 1))
    engine_logprobs = torch.zeros((len(samples), width - 1))
    for row, sample in enumerate(samples):
        sequence = sample.prompt_token_ids + sample.completion_token_ids
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        # The first completion token is predicted at the last prompt position.
        start, end = len(sample.prompt_token_ids) - 1, len(sequence) - 1
        completion_mask[row, start:end] = 1
        engine_logprobs[row, start:end] = torch.tensor(sample.engine_logprobs, dtype=torch.float32)
    return PaddedBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        target_ids=input_ids[:, 1:],
        completion_mask=completion_mask,
        engine_logprobs=engine_logprobs,
        advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float32),
    )
