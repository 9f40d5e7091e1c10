"""The run report (`dynalign report RUN_DIR`): every plot is written and loads in a real browser,
missing metrics are skipped, evaluation results and generated-prompt figures are included."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dynalign.config import EvalConfig
from dynalign.report import length_hacking_note, write_report, write_report_safely

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(iterations: int = 5) -> list[dict]:
    rows = []
    for i in range(iterations):
        rows.append({
            "iteration": i, "time": 1.7e9 + i,
            "reward_mean": 1.0 + 0.3 * i, "reward_min": 0.2 * i, "reward_max": 2.0 + 0.4 * i,
            "completion_length_mean": 20.0 + 8 * i, "truncated_share": 0.1 * i, "tied_group_share": 0.0,
            "judge.parse_failures": float(i % 2), "judge.judgements": 32.0, "judge.invalid_share": 0.01 * i,
            "judge.repeat_agreement": 0.8 - 0.01 * i,  # a key the judge may add later: plotted as found
            "adv.reward_std": 0.5, "adv.advantage_abs_max": 2.0,
            "learner.approx_kl": 0.001 * i, "learner.engine_gap_k3": 1e-6, "learner.clip_frac_low": 0.01,
            "learner.clip_frac_high": 0.02 * i, "learner.ratio_mean": 1.0, "learner.entropy": 5.0 - 0.1 * i,
            "learner.loss": -0.01, "learner.grad_norm": float("nan") if i == 2 else 1.5,
            "prompts.generated": 40.0, "prompts.kept": 30.0 - i,
            "sync_seconds": 0.04, "time.generate": 2.0, "time.total": 3.0,
            "note": "not a number",
        })
    return rows


def _value_alignment(tmp_path: Path) -> dict:
    """A value-alignment result made by the real summary code from synthetic judgements."""
    from dynalign.eval_tables import summarize, verdicts, write_outputs

    ev = EvalConfig(bootstrap_samples=200)
    rows = []
    for i in range(24):
        preference = [0.9, 0.5, 0.2, 0.7][i % 4]
        rows.append({"id": f"e{i}", "pillar": ["Knowledge", "Benevolence", "Power", "Vitality"][i % 4],
                     "prompt": f"question {i}", "preference_policy": preference,
                     "answer_baseline": f"base answer {i}",
                     "answer_policy": f"base answer {i}" if i < 3 else f"aligned answer {i}",
                     "rubric_policy": 3.0 + (i % 3) / 2, "rubric_baseline": 2.5})
    for row, verdict in zip(rows, verdicts([r["preference_policy"] for r in rows], ev.tie_band)):
        row["verdict"] = verdict
    result = {"value": "Collective Agency", "policy": "run/policy", "baseline": "tiny",
              "judge": {"kind": "model", "model": "tiny", "mode": "logprob"},
              "prompts": {"evaluated": 24, "dropped_not_held_out": 1, "total": 25, "holdout_threshold": 0.7,
                          "training_prompts": 40},
              "settings": {"tie_band": ev.tie_band, "confidence": ev.confidence, "bootstrap_samples": 200, "seed": 0,
                           "score_min": 0, "score_max": 5},
              **summarize(rows, ev), "position": {"first_preference_mean": 0.52, "order_agreement": 0.6}}
    write_outputs(tmp_path, result, rows)
    return result


def make_run(run_dir: Path, iterations: int = 5, with_prompts: bool = True) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in _metrics(iterations)) + "{cut sho")
    samples = [{"iteration": i, "prompt_id": f"p{j}", "prompt": "q", "answer": "a", "reward": 0.5 * i + 0.1 * j}
               for i in range(iterations) for j in range(4)]
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (run_dir / "summary.json").write_text(json.dumps({"reward_mean_first": 1.0, "reward_mean_last": 2.2}))
    (run_dir / "config.yaml").write_text("judge:\n  kind: policy\n  mode: logprob\ngeneration:\n  novelty_threshold: 0.7\n")
    _value_alignment(run_dir / "eval")
    harness = {"lm_eval_version": "0.4.13", "backend": "vllm", "tasks": ["dynalign_exact"],
               "models": {"policy": "run/policy", "baseline": "tiny"},
               "results": {"policy": {"dynalign_exact": {"exact_match": 0.25}},
                           "baseline": {"dynalign_exact": {"exact_match": 0.1875}}}}
    (run_dir / "eval" / "harness.json").write_text(json.dumps(harness))
    if with_prompts:
        from dynalign.prompt_store import PromptStore

        words = ["river", "school", "garden", "budget", "clinic", "library", "bridge", "forest", "market", "harbour"]
        for iteration in range(2):
            rows = [{"id": f"g{iteration}-{k}", "prompt": f"How can a town improve its {words[k]} for everyone "
                                                          f"in year {iteration}?",
                     "pillar": ["Knowledge", "Power"][k % 2], "domain": "towns", "kind": "advice request",
                     "generator": "policy", "rouge_l_best": 0.3, "nearest_id": None, "words": 11}
                    for k in range(len(words))]
            PromptStore(run_dir / "prompts").save(iteration, rows, {"candidates": 12, "requests": 2,
                                                                    "dropped.not_novel": 2})
    return run_dir


def _images(index: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', index.read_text())


def test_report_writes_every_plot_and_table(tmp_path):
    run_dir = make_run(tmp_path / "run")
    index = write_report(run_dir)
    assert index == run_dir / "report" / "index.html"
    page = index.read_text()
    images = _images(index)
    for title in ("Reward per iteration", "Score distributions", "Response length", "KL and clipping", "Judge",
                  "Prompt diversity", "Evaluations", "Other metrics", "All metrics"):
        assert f">{title}</h2>" in page, title
    for name in ("reward.png", "scores.png", "length.png", "kl_clip.png", "judge.png", "prompts.png",
                 "data_report/overview.png"):
        assert name in images, name
    assert any(i.startswith("eval_") for i in images)
    for image in images:  # every image referenced is a real PNG next to the page
        data = (index.parent / image).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000, image
    assert f'data-images="{len(images)}"' in page
    # Tables: evaluations with intervals, lm-eval, every numeric metric (a string metric is not).
    assert "Value alignment: Collective Agency" in page and "Knowledge" in page
    assert re.search(r"\d+\.\d% \[\d+\.\d, \d+\.\d\]", page)
    assert "dynalign_exact" in page and "0.25" in page
    # Five before/after pairs: the first answers that differ (rows 0-2 are identical).
    assert "3 of 24 held-out answers are identical" in page
    assert [f"aligned answer {i}" in page for i in range(3, 10)] == [True] * 5 + [False] * 2
    assert "judge.repeat_agreement" in page and "learner.grad_norm" in page and ">note<" not in page
    assert "correlation with the mean reward" in page
    assert (run_dir / "data_report" / "summary.json").is_file()  # written for the report


def test_report_skips_what_a_run_does_not_have(tmp_path):
    run_dir = tmp_path / "bare"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"iteration": 0, "reward_mean": 0.5}) + "\n")
    index = write_report(run_dir)
    page = index.read_text()
    assert _images(index) == ["reward.png"]
    for title in ("KL and clipping", "Judge", "Prompt diversity", "Evaluations", "Score distributions"):
        assert f">{title}</h2>" not in page
    # A later report with fewer figures leaves no stale PNGs behind.
    assert sorted(p.name for p in (run_dir / "report").glob("*.png")) == ["reward.png"]


def test_report_errors_are_one_line_and_train_only_warns(tmp_path, capsys):
    from dynalign.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dynalign: error: report") and "\n" not in err
    assert write_report_safely(tmp_path / "missing") is None
    err = capsys.readouterr().err.strip()
    assert err.startswith("dynalign: warning: run report not written") and "\n" not in err
    run_dir = make_run(tmp_path / "run", with_prompts=False)
    assert main(["report", str(run_dir), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "index.html").is_file()


def test_length_hacking_note():
    rising = [{"completion_length_mean": 10.0 * (i + 1), "reward_mean": float(i)} for i in range(5)]
    text, suspicious = length_hacking_note(rising)
    assert suspicious and "length hacking" in text
    flat = [{"completion_length_mean": 30.0, "reward_mean": float(i)} for i in range(5)]
    assert length_hacking_note(flat)[1] is False
    assert length_hacking_note(rising[:1]) is None


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make install adds it: apt-get install chromium)")
def test_report_images_load_in_headless_chromium(tmp_path):
    run_dir = make_run(tmp_path / "run")
    index = write_report(run_dir)
    count = len(_images(index))
    assert count >= 10
    done = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", index.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    # The page's script sets this after `load`: images with naturalWidth > 0 out of all <img>.
    marker = re.search(r'data-images-loaded="(\d+)/(\d+)"', done.stdout)
    assert marker, "the page's load script did not run"
    assert (int(marker.group(1)), int(marker.group(2))) == (count, count)

    # A broken image is caught by the same check.
    (index.parent / "reward.png").write_bytes(b"not a png")
    done = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", index.as_uri())
    assert f'data-images-loaded="{count - 1}/{count}"' in done.stdout

    shot = tmp_path / "shot.png"
    done = _chromium(tmp_path, "--hide-scrollbars", "--window-size=1200,1600", f"--screenshot={shot}", index.as_uri())
    assert shot.read_bytes().startswith(PNG_MAGIC)


def test_metrics_with_nan_only_are_skipped(tmp_path):
    run_dir = tmp_path / "nan"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i, "reward_mean": 1.0 + i,
                                                               "learner.approx_kl": math.nan}) + "\n"
                                                   for i in range(3)))
    page = write_report(run_dir).read_text()
    assert ">KL and clipping</h2>" not in page and "learner.approx_kl" not in page
