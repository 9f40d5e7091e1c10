"""A weight sync into a model with tied input/output embeddings (Qwen2.5-0.5B, Llama-3.2-1B, ...).

vLLM's CPU backend packs the LM head's weight into a kernel copy after loading; a tied head shares
``embed_tokens.weight``, and the in-place reload used to update the shared tensor without
re-packing the head, so the engine sampled from the new body through the old head. Found by
``benchmarks/bench_sync.py``'s check; fixed in ``dynalign/vllm_ext.py``. Slow: starts an engine."""

from __future__ import annotations

import pytest

from tests.conftest import tiny_config

pytestmark = pytest.mark.slow


def _tied_model(path, seed: int) -> str:
    import torch
    from transformers import LlamaForCausalLM

    from dynalign.tiny_model import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    config = build_model(tokenizer, seed=seed).config
    config.tie_word_embeddings = True
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


class _Learner:
    """The one method WeightSync calls: one bucket of a Hugging Face model's weights, in the wire format."""

    def __init__(self, model):
        self.model = model

    def export_weights(self, bucket_bytes: int, dtype_name: str) -> dict:
        import ray
        import torch

        from dynalign.buckets import to_wire

        bucket = {n: p.detach().to(getattr(torch, dtype_name)).contiguous() for n, p in self.model.named_parameters()}
        return {"buckets": [ray.put(to_wire(bucket))], "bytes": sum(t.nbytes for t in bucket.values())}


def test_sync_into_tied_embedding_model_updates_the_lm_head(ray_local, tmp_path):
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from dynalign.driver import absolute_paths
    from dynalign.rollout import RolloutPool
    from dynalign.weight_sync import WeightSync

    path_a, path_b = _tied_model(tmp_path / "a", seed=0), _tied_model(tmp_path / "b", seed=1)
    model_a = AutoModelForCausalLM.from_pretrained(path_a, dtype=torch.float32)
    model_b = AutoModelForCausalLM.from_pretrained(path_b, dtype=torch.float32)
    assert model_b.lm_head.weight.data_ptr() == model_b.model.embed_tokens.weight.data_ptr()
    ids = list(range(5, 45))

    def reference(model, lm_head=None) -> list[float]:
        with torch.no_grad():
            hidden = model.model(torch.tensor([ids])).last_hidden_state[0]
            logprobs = torch.log_softmax(hidden @ (lm_head if lm_head is not None else model.lm_head.weight).T, -1)
        return [float(logprobs[i, ids[i + 1]]) for i in range(len(ids) - 1)]

    config = absolute_paths(tiny_config(path_a, tmp_path / "run", "judge.kind=rule"))
    rollout = RolloutPool(config)
    try:
        WeightSync(config, rollout.synced).sync(_Learner(model_b), version=1)
        out = ray.get(rollout.workers[0].generate_from_token_ids.remote(
            [ids], {"max_tokens": 1, "prompt_logprobs": 0, "temperature": 1.0, "detokenize": False}))[0]
        engine = [float(step[token].logprob) for step, token in zip(out.prompt_logprobs[1:], ids[1:])]
    finally:
        rollout.shutdown()

    def gap(a, b):
        return max(abs(x - y) for x, y in zip(a, b))

    stale_head = reference(model_b, lm_head=model_a.lm_head.weight)  # new body, old head
    print(f"max |engine - B| {gap(engine, reference(model_b)):.4f}; vs A {gap(engine, reference(model_a)):.4f}; "
          f"vs B body + A head {gap(engine, stale_head):.4f}")
    assert gap(reference(model_b), stale_head) > 0.1, "the probe must tell the two heads apart"
    assert gap(engine, reference(model_b)) < 0.05
