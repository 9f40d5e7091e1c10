"""The benchmark suite's bookkeeping (no benchmark is run, nothing is timed): ratio, median, min
and max arithmetic, targets, the JSON schema and file, the table."""

from __future__ import annotations

import importlib
import json
import math

import pytest

from benchmarks import common
from benchmarks.common import (
    bench_result,
    check,
    document,
    figure,
    format_table,
    paired_ratios,
    series,
    summarize,
    validate,
    write_results,
)

MACHINE = {"slug": "2cpu-test-24g", "hostname": "host", "cpu": "Test CPU", "cores": 2, "memory_gib": 24.0,
           "load_avg_start": [1.0, 1.0, 1.0], "versions": {"python": "3.11"}}


def synthetic_document(quick: bool = False) -> dict:
    rollout = bench_result(
        "rollout", "Rollout",
        figures=[figure("pool_over_vllm", "pool / vLLM (tokens/s)", series("pool", "tokens/s", [900, 950, 990]),
                        series("vllm", "tokens/s", [1000, 1000, 1100]), (">=", 0.9)),
                 figure("vllm_over_hf", "vLLM / transformers", series("vllm", "tokens/s", [1000, 1000, 1100]),
                        series("hf", "tokens/s", [100, 125, 100]))],
        checks=[check("same samples", True, "32/32")], wall_s=12.5)
    sync = bench_result(
        "weight_sync", "Sync",
        figures=[figure("sync_over_reload", "sync / reload", series("sync", "s", [3.0, 2.0]),
                        series("reload", "s", [1.0, 1.0]), ("<=", 2.5))],
        checks=[check("engines hold the learner's weights", False, "gap 2.5")])
    broken = bench_result("learner", "Learner", error="Traceback ...\nRuntimeError: out of memory")
    return document([rollout, sync, broken], MACHINE, quick, "2026-11-24T10:00:00+00:00", "2026-11-24T10:20:00+00:00")


def test_summarize_median_min_max():
    assert summarize([3, 1, 2]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3, "values": [3.0, 1.0, 2.0]}
    even = summarize([4, 1, 3, 2])
    assert (even["median"], even["min"], even["max"], even["n"]) == (2.5, 1.0, 4.0, 4)
    assert summarize([7])["median"] == 7.0
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize([1.0, math.nan])


def test_paired_ratios_pair_and_broadcast():
    assert paired_ratios([2, 9, 8], [1, 3, 4]) == [2.0, 3.0, 2.0]
    assert paired_ratios([12], [3, 4, 6]) == [4.0, 3.0, 2.0]  # one naive run against three fast runs
    assert paired_ratios([3, 6], [3]) == [1.0, 2.0]
    with pytest.raises(ValueError):
        paired_ratios([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        paired_ratios([], [1])
    with pytest.raises(ZeroDivisionError):
        paired_ratios([1, 2], [1, 0])


def test_figure_ratio_statistics_and_targets():
    f = figure("x", "x", series("a", "tokens/s", [900, 950, 990]), series("b", "tokens/s", [1000, 1000, 1100]),
               (">=", 0.9))
    assert f["ratio"]["values"] == [0.9, 0.95, 0.9]
    assert (f["ratio"]["median"], f["ratio"]["min"], f["ratio"]["max"]) == (0.9, 0.9, 0.95)
    assert f["numerator"]["median"] == 950 and f["denominator"]["max"] == 1100 and f["numerator"]["unit"] == "tokens/s"
    assert f["meets_target"] is True  # the median meets it, exactly at the bound
    lower = figure("y", "y", series("a", "s", [3.0, 2.0]), series("b", "s", [1.0, 1.0]), ("<=", 2.5))
    assert lower["ratio"]["median"] == 2.5 and lower["meets_target"] is True
    miss = figure("z", "z", series("a", "s", [3.0, 4.0]), series("b", "s", [1.0]), ("<=", 2.5))
    assert miss["ratio"]["values"] == [3.0, 4.0] and miss["meets_target"] is False
    info = figure("w", "w", series("a", "MiB", [10]), series("b", "MiB", [4]))
    assert info["target"] is None and info["meets_target"] is None and info["ratio"]["median"] == 2.5
    with pytest.raises(ValueError):
        figure("v", "v", series("a", "s", [1]), series("b", "s", [1]), ("==", 1))


def test_result_ok_only_if_every_check_passed_and_no_error():
    assert bench_result("a", "A", checks=[check("c", True)])["ok"] is True
    assert bench_result("a", "A", checks=[check("c", True), check("d", False)])["ok"] is False
    assert bench_result("a", "A", error="boom")["ok"] is False


def test_json_file_name_schema_and_round_trip(tmp_path):
    doc = synthetic_document()
    path = write_results(doc, tmp_path)
    assert path.name == "2026-11-24-2cpu-test-24g.json"
    loaded = json.loads(path.read_text())
    validate(loaded)
    assert loaded["schema"] == common.SCHEMA
    assert [b["name"] for b in loaded["benchmarks"]] == ["rollout", "weight_sync", "learner"]
    fig = loaded["benchmarks"][0]["figures"][0]
    assert fig["ratio"]["median"] == pytest.approx(0.9) and fig["target"] == {"op": ">=", "value": 0.9}
    assert loaded["benchmarks"][1]["ok"] is False and loaded["benchmarks"][2]["error"].endswith("out of memory")
    assert not list(tmp_path.glob("*.tmp"))
    assert write_results(synthetic_document(quick=True), tmp_path).name == "2026-11-24-2cpu-test-24g-quick.json"


def test_only_run_merges_into_the_days_file(tmp_path):
    write_results(synthetic_document(), tmp_path)
    rerun = bench_result("learner", "Learner", figures=[figure("f", "f", series("a", "s", [2]), series("b", "s", [1]))],
                         checks=[check("finite loss", True)])
    path = write_results(document([rerun], MACHINE, False, "2026-11-24T11:00:00+00:00", "2026-11-24T11:05:00+00:00"),
                         tmp_path, merge=True)
    merged = json.loads(path.read_text())
    assert [b["name"] for b in merged["benchmarks"]] == ["rollout", "weight_sync", "learner"]
    assert merged["benchmarks"][2]["ok"] is True and merged["benchmarks"][2]["figures"][0]["ratio"]["median"] == 2.0


@pytest.mark.parametrize("tamper, message", [
    (lambda d: d.pop("machine"), "missing machine"),
    (lambda d: d.update(schema="other/0"), "schema"),
    (lambda d: d["benchmarks"][0]["figures"][0]["ratio"].update(median=0.5), "median/min/max"),
    (lambda d: d["benchmarks"][0]["figures"][0]["ratio"].update(values=[1.0, 1.0, 1.0], median=1.0, min=1.0, max=1.0),
     "numerator / denominator"),
    (lambda d: d["benchmarks"][0]["figures"][0].update(meets_target=False), "meets_target"),
    (lambda d: d["benchmarks"][0]["figures"][0]["numerator"].pop("unit"), "missing unit"),
    (lambda d: d["benchmarks"][1].update(ok=True), "check failed"),
    (lambda d: d["benchmarks"][0]["figures"][1]["denominator"].update(n=2), "n = 2"),
])
def test_validate_rejects_inconsistent_documents(tamper, message):
    doc = json.loads(json.dumps(synthetic_document()))
    validate(doc)
    tamper(doc)
    with pytest.raises(ValueError, match=message):
        validate(doc)


def test_table_shows_each_figure_against_its_target():
    table = format_table(synthetic_document())
    lines = table.splitlines()
    row = next(line for line in lines if "pool / vLLM (tokens/s)" in line)
    assert row.split()[:1] == ["rollout"] and ">= 0.9" in row and row.rstrip().endswith("OK")
    assert "0.9" in row and "0.95" in row
    assert next(line for line in lines if "sync / reload" in line).rstrip().endswith("OK")
    assert next(line for line in lines if "vLLM / transformers" in line).rstrip().endswith("info")
    assert any("ERROR: RuntimeError: out of memory" in line for line in lines)
    assert any("FAILED: engines hold the learner's weights (gap 2.5)" in line for line in lines)
    assert "2cpu-test-24g" in lines[0]


def test_machine_slug_is_short_and_file_safe():
    slug = common.machine_slug(2, "AMD EPYC 7B13 64-Core Processor", 23.5)
    assert slug.startswith("2cpu-amd-epyc") and slug.endswith("-24g")
    assert all(c.isalnum() or c == "-" for c in slug) and len(slug) <= 40


def test_roles_from_process_titles():
    assert common.ray_role("ray::RolloutWorker.generate_groups") == "rollout"
    assert common.ray_role("ray::JudgeWorker") == "judge"
    assert common.ray_role("ray::RayTrainWorker.init_train_context") == "learner"
    assert common.ray_role("ray::IDLE") is None and common.ray_role("VLLM::Worker") is None
    assert common.is_compiler("/usr/lib/gcc/x86_64-linux-gnu/12/cc1plus") and not common.is_compiler("ray::_fit")


def test_every_suite_benchmark_imports_cheaply_and_reports_a_crash(tmp_path):
    from benchmarks import run as suite

    for name, (module, *_rest) in suite.BENCHMARKS.items():
        mod = importlib.import_module(module)
        assert callable(mod.run) and mod.NAME == name
    out = tmp_path / "r.json"

    def crashes(quick):
        raise RuntimeError("engine died")

    result = common.bench_main("x", "X", crashes, ["--quick", "--out", str(out)])
    assert result["ok"] is False and "RuntimeError: engine died" in json.loads(out.read_text())["error"]


def test_suite_budget_spent_reports_not_run(tmp_path):
    from benchmarks import run as suite

    result = suite.run_one("learner", quick=True, log_dir=tmp_path, budget_s=5)
    assert result["ok"] is False and "time budget" in result["error"]
    assert not list(tmp_path.iterdir())  # nothing was started
