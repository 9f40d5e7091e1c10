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
    """A prompt and its G candidates; the judge fills ``rewards`` (NaN = invalid judgement).
    ``generation_version``: the weight version (syncs so far) of the engine that sampled them;
    ``judge_version``: that of the engine that judged them (None: no policy weights judged, as
    with the rule or an external judge)."""

    prompt_id: str
    prompt: str
    prompt_token_ids: list[int]
    candidates: list[Candidate]
    rewards: list[float] = field(default_factory=list)
    judge_info: dict = field(default_factory=dict)
    generation_version: int = 0
    judge_version: int | None = None


@dataclass
class Sample:
    """One training sequence: prompt + candidate, with its advantage."""

    prompt_token_ids: list[int]
    completion_token_ids: list[int]
    engine_logprobs: list[float]
    advantage: float


@dataclass
class PaddedBatch:
    """Right-padded tensors. Positions before ``scored_from`` predict prompt tokens of every row and
    are dropped: position t of every [B, T-1-scored_from] tensor scores token scored_from+t+1, and
    the model computes logits only for the last T-scored_from positions (``logits_to_keep``)."""

    input_ids: torch.Tensor        # [B, T]
    attention_mask: torch.Tensor   # [B, T]
    target_ids: torch.Tensor       # [B, T-1-scored_from]
    completion_mask: torch.Tensor  # [B, T-1-scored_from], 1 where the target is a completion token
    engine_logprobs: torch.Tensor  # [B, T-1-scored_from], 0 outside the completion
    advantages: torch.Tensor       # [B]
    scored_from: int = 0           # first position whose prediction can be a completion token

    @property
    def logits_to_keep(self) -> int:
        return self.input_ids.shape[1] - self.scored_from


def pad_samples(samples: list[Sample], pad_token_id: int) -> PaddedBatch:
    lengths = [len(s.prompt_token_ids) + len(s.completion_token_ids) for s in samples]
    width = max(lengths)
    # The first completion token is predicted at the last prompt position.
    scored_from = min(len(s.prompt_token_ids) for s in samples) - 1
    scored = width - 1 - scored_from
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    completion_mask = torch.zeros((len(samples), scored))
    engine_logprobs = torch.zeros((len(samples), scored))
    for row, sample in enumerate(samples):
        sequence = sample.prompt_token_ids + sample.completion_token_ids
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        start, end = len(sample.prompt_token_ids) - 1 - scored_from, len(sequence) - 1 - scored_from
        completion_mask[row, start:end] = 1
        engine_logprobs[row, start:end] = torch.tensor(sample.engine_logprobs, dtype=torch.float32)
    return PaddedBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        target_ids=input_ids[:, scored_from + 1:],
        completion_mask=completion_mask,
        engine_logprobs=engine_logprobs,
        advantages=torch.tensor([s.advantage for s in samples], dtype=torch.float32),
        scored_from=scored_from,
    )


def sequence_length(sample: Sample) -> int:
    return len(sample.prompt_token_ids) + len(sample.completion_token_ids)


def rank_micro_batches(samples: list[Sample], rank: int, world_size: int, micro_batch_size: int,
                       pad_token_id: int, by_length: bool = True) -> list[PaddedBatch]:
    """This rank's micro-batches of ``samples``. By length: the samples are sorted longest first,
    dealt to the ranks in turn (every rank gets a like share of long and short ones) and cut into
    micro-batches of neighbours, so each pads to a length close to its own rows'. The loss is a
    sum over samples with a whole-batch normaliser, so the order changes no gradient."""
    if by_length:
        samples = sorted(samples, key=sequence_length, reverse=True)  # stable: the same on every rank
    share = samples[rank::world_size]
    return [pad_samples(share[i:i + micro_batch_size], pad_token_id) for i in range(0, len(share), micro_batch_size)]


def padding_fraction(batches: list[PaddedBatch]) -> float:
    """Share of the input positions that are padding."""
    total = sum(b.attention_mask.numel() for b in batches)
    return 1.0 - sum(int(b.attention_mask.sum()) for b in batches) / max(total, 1)
