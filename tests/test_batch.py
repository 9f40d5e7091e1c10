"""How the learner turns samples into tensors: prompt positions left out of the LM head, micro-
batches of like length, and neither changing a log-prob or a gradient (the tiny model, no Ray)."""

from __future__ import annotations

import random

import pytest
import torch

from dynalign import grpo
from dynalign.batch import Sample, pad_samples, padding_fraction, rank_micro_batches


def _samples(vocab: int, count: int = 12, seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 12))]
        completion = [rng.randrange(3, vocab) for _ in range(rng.choice([2, 3, 20, 28]))]
        samples.append(Sample(prompt_token_ids=prompt, completion_token_ids=completion,
                              engine_logprobs=[-rng.uniform(1, 6) for _ in completion],
                              advantage=rng.uniform(-1.5, 1.5)))
    return samples


@pytest.fixture(scope="module")
def model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float64).train()


def test_pad_samples_scores_from_the_shortest_prompt():
    short, long = (Sample([5, 6, 7], [8, 9], [-1.0, -2.0], 1.0), Sample([5, 6, 7, 10, 11], [12], [-3.0], -1.0))
    batch = pad_samples([long, short], pad_token_id=0)
    assert batch.scored_from == 2 and batch.logits_to_keep == 6 - 2
    # Position t scores token scored_from + t + 1: the short row's completion starts at t = 0.
    assert batch.target_ids.tolist() == [[10, 11, 12], [8, 9, 0]]
    assert batch.completion_mask.tolist() == [[0, 0, 1], [1, 1, 0]]
    assert batch.engine_logprobs.tolist() == [[0, 0, -3.0], [-1.0, -2.0, 0]]


def test_logits_to_keep_gives_the_full_forwards_logprobs(model):
    batch = pad_samples(_samples(model.config.vocab_size, 6), pad_token_id=0)
    assert batch.scored_from > 0
    full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, batch.scored_from:-1]
    kept = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 logits_to_keep=batch.logits_to_keep).logits[:, :-1]
    mask = batch.completion_mask.bool()
    assert kept.shape == full.shape
    assert torch.allclose(grpo.token_logprobs(kept, batch.target_ids)[mask],
                          grpo.token_logprobs(full, batch.target_ids)[mask], atol=1e-12)


def _step_gradient(model, samples, world_size: int, by_length: bool) -> list[torch.Tensor]:
    """The whole step's gradient: every rank's micro-batches (ratio 1, one update), summed, as
    DeepSpeed's all-reduce (with the learner's world-size scaling) sums them."""
    model.zero_grad()
    normalizer = grpo.LossNormalizer(mode="token_mean", num_sequences=len(samples),
                                     num_tokens=sum(len(s.completion_token_ids) for s in samples), max_len=32)
    for rank in range(world_size):
        for batch in rank_micro_batches(samples, rank, world_size, 2, pad_token_id=0, by_length=by_length):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           logits_to_keep=batch.logits_to_keep).logits[:, :-1]
            logprobs = grpo.token_logprobs(logits, batch.target_ids)
            weights = grpo.truncated_is_weights(logprobs.detach(), batch.engine_logprobs.double(), 2.0)
            loss, _ = grpo.policy_loss(logprobs, logprobs.detach(), batch.advantages.double(),
                                       batch.completion_mask.double(), normalizer, is_weights=weights)
            loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.fixture(scope="module")
def arrival_gradient(model) -> list[torch.Tensor]:
    """The reference: one rank, micro-batches cut in arrival order (float64 backward passes are
    the module's slowest part; both world sizes compare with this one)."""
    return _step_gradient(model, _samples(model.config.vocab_size), 1, by_length=False)


@pytest.mark.parametrize("world_size", [1, 2])
def test_length_sorted_micro_batches_keep_the_gradient_and_cut_padding(model, arrival_gradient, world_size):
    samples = _samples(model.config.vocab_size)
    arrival = arrival_gradient
    sorted_ = _step_gradient(model, samples, world_size, by_length=True)
    for a, b in zip(arrival, sorted_, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert any(a.abs().sum() > 0 for a in arrival)

    def padding(by_length: bool) -> float:
        return padding_fraction([b for rank in range(world_size)
                                 for b in rank_micro_batches(samples, rank, world_size, 2, 0, by_length=by_length)])

    print(f"world {world_size}: padding {padding(False):.2f} in arrival order, {padding(True):.2f} sorted by length")
    assert padding(True) < padding(False)


def test_ranks_get_every_sample_once_and_like_shares():
    samples = _samples(300, 16, seed=3)
    shares = [[row for b in rank_micro_batches(samples, rank, 2, 4, 0) for row in b.attention_mask.sum(1).tolist()]
              for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(len(s.prompt_token_ids) + len(s.completion_token_ids)
                                                   for s in samples)
    assert abs(sum(shares[0]) - sum(shares[1])) <= max(shares[0] + shares[1])  # dealt in turn, longest first
