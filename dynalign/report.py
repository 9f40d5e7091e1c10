"""`dynalign report RUN_DIR`: one HTML page of a run, ``RUN_DIR/report/index.html``, with PNG plots
(matplotlib, Agg) and tables. ``dynalign train`` writes it at the end of every run.

Sections, each drawn only from what the run has (missing metrics are skipped, new ``judge.*`` or
``learner.*`` keys show up without code changes):

- evaluations first (``RUN_DIR/eval/*.json`` written by ``dynalign eval``: win/tie/loss with
  intervals, rubric scores, five before/after answer pairs, lm-eval tables);
- reward per iteration (mean with the min..max band);
- score distributions (the candidates logged in ``samples.jsonl``, per iteration);
- response length per iteration, with the truncated share and the length/reward correlation (a
  rising length that tracks the reward is the signature of length hacking);
- KL and clipping (``learner.*kl*``, ``learner.clip_frac_*``, importance ratios, entropy);
- the judge (every ``judge.*`` key: parse failures, invalid share, agreement, ...);
- prompt diversity (``prompts.*`` metrics and the figures of ``dynalign data-report`` when the
  run generated its prompts: ``RUN_DIR/prompts``);
- every other metric as small multiples, and a first/last/min/max table of all of them.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

from dynalign import files, report_eval, report_page
from dynalign.config import ConfigError, writable_dir
from dynalign.stats import pearson

log = logging.getLogger(__name__)

SECTION_KEYS = {
    "reward": ("reward_mean", "reward_min", "reward_max"),
    "length": ("completion_length_mean", "truncated_share"),
}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def _jsonl(path: Path) -> list[dict]:
    """The records of a run's JSON-lines log (none if it is missing; a line cut by a crash skipped)."""
    return [r for r in files.read_jsonl(path, missing_ok=True) if isinstance(r, dict)]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def numeric_keys(metrics: list[dict]) -> list[str]:
    """Metric keys with at least one finite number, in first-seen order (bookkeeping left out)."""
    keys: dict[str, None] = {}
    for record in metrics:
        for key, value in record.items():
            if key not in ("iteration", "time") and _finite(value):
                keys.setdefault(key, None)
    return list(keys)


def series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(m.get("iteration", i), m[key]) for i, m in enumerate(metrics) if _finite(m.get(key))]
    return [p[0] for p in points], [float(p[1]) for p in points]


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------

def _lines(ax, metrics: list[dict], keys: Sequence[str], title: str, ylabel: str = "") -> None:
    for key in keys:
        x, y = series(metrics, key)
        if y:
            ax.plot(x, y, marker="o", markersize=3, label=key)
    ax.set_title(title, fontsize=10)
    _iteration_axis(ax)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(keys) > 1:
        ax.legend(fontsize=7)


def _iteration_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _present(metrics: list[dict], keys: Sequence[str]) -> list[str]:
    return [k for k in keys if series(metrics, k)[1]]


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

def _overview(page: report_page.Page, run_dir: Path, metrics: list[dict]) -> None:
    page.section("Run")
    summary = {}
    if (run_dir / "summary.json").is_file():
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except json.JSONDecodeError:
            summary = {}
    rows = [("run dir", str(run_dir)), ("iterations logged", len(metrics))]
    for key in ("reward_mean_first", "reward_mean_last"):
        if summary.get(key) is not None:
            rows.append((key.replace("_", " "), summary[key]))
    seconds = [m["time.total"] for m in metrics if _finite(m.get("time.total"))]
    if seconds:
        rows.append(("seconds per iteration (mean)", sum(seconds) / len(seconds)))
    config = _config(run_dir)
    for key in ("model.path", "judge.kind", "judge.mode", "rollout.group_size", "data.prompts_per_iteration",
                "learner.lr", "generation.enabled"):
        value = _select(config, key)
        if value is not None:
            rows.append((key, value))
    page.table(("", "value"), rows)


def _config(run_dir: Path) -> dict:
    if not (run_dir / "config.yaml").is_file():
        return {}
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")) or {}
    except Exception:
        return {}


def _select(config: dict, dotted: str):
    value = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _reward(page: report_page.Page, metrics: list[dict]) -> set[str]:
    keys = _present(metrics, SECTION_KEYS["reward"])
    if not keys:
        return set()
    page.section("Reward per iteration")

    def draw(figure, axes):
        ax = axes[0]
        x, mean = series(metrics, "reward_mean")
        ax.plot(x, mean, marker="o", label="reward_mean")
        xl, low = series(metrics, "reward_min")
        xh, high = series(metrics, "reward_max")
        if low and high and xl == xh:
            ax.fill_between(xl, low, high, alpha=0.2, label="min..max")
        ax.set_title("Reward (judge score) per iteration", fontsize=10)
        _iteration_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    page.figure("reward.png", draw, "Mean reward of the candidates trained on, with the min..max band.")
    return set(keys)


def _scores(page: report_page.Page, run_dir: Path) -> None:
    samples = [s for s in _jsonl(run_dir / "samples.jsonl") if _finite(s.get("reward"))]
    if not samples:
        return
    page.section("Score distributions")
    iterations = sorted({s["iteration"] for s in samples})
    by_iteration = [[s["reward"] for s in samples if s["iteration"] == i] for i in iterations]

    def draw(figure, axes):
        box, hist = axes
        box.boxplot(by_iteration, positions=iterations, widths=0.6)
        box.set_title("Scores of logged candidates per iteration", fontsize=10)
        box.set_xlabel("iteration")
        box.grid(alpha=0.3)
        import numpy as np

        first, last = by_iteration[0], by_iteration[-1]
        bins = np.histogram_bin_edges(first + last, bins=12)
        hist.hist(first, bins=bins, alpha=0.6, label=f"iteration {iterations[0]}")
        if len(iterations) > 1:
            hist.hist(last, bins=bins, alpha=0.6, label=f"iteration {iterations[-1]}")
        hist.set_title("First vs last iteration", fontsize=10)
        hist.set_xlabel("score")
        hist.legend(fontsize=8)

    page.figure("scores.png", draw, f"{len(samples)} candidates logged in samples.jsonl "
                                    "(logging.log_samples per iteration).", width=10.0, cols=2)


def _length(page: report_page.Page, metrics: list[dict]) -> set[str]:
    keys = _present(metrics, SECTION_KEYS["length"])
    if not keys:
        return set()
    page.section("Response length")
    _, lengths = series(metrics, "completion_length_mean")

    def draw(figure, axes):
        ax = axes[0]
        _lines(ax, metrics, ["completion_length_mean"], "Mean response length (tokens)", "tokens")
        if "truncated_share" in keys:
            twin = ax.twinx()
            x, y = series(metrics, "truncated_share")
            twin.plot(x, y, color="tab:red", linestyle="--", marker="x", label="truncated_share")
            twin.set_ylabel("truncated share", color="tab:red")
            twin.set_ylim(-0.05, 1.05)

    page.figure("length.png", draw, "Mean answer length per iteration; dashed: share of answers cut at "
                                    "rollout.max_new_tokens.")
    note = length_hacking_note(metrics)
    if note:
        page.text(note[0], "warn" if note[1] else "")
    return set(keys)


def length_hacking_note(metrics: list[dict]) -> tuple[str, bool] | None:
    """A sentence on length vs reward, and whether it looks like length hacking."""
    pairs = [(m["completion_length_mean"], m["reward_mean"]) for m in metrics
             if _finite(m.get("completion_length_mean")) and _finite(m.get("reward_mean"))]
    if len(pairs) < 2:
        return None
    lengths, rewards = [p[0] for p in pairs], [p[1] for p in pairs]
    change = (lengths[-1] - lengths[0]) / lengths[0] if lengths[0] else 0.0
    text = f"Response length went from {lengths[0]:.1f} to {lengths[-1]:.1f} tokens ({100 * change:+.0f}%)"
    r = pearson(lengths, rewards) if len(pairs) >= 3 else math.nan
    if not math.isnan(r):
        text += f"; correlation with the mean reward across iterations r = {r:.2f}"
    suspicious = r > 0.7 and change > 0.2
    if suspicious:
        text += ". Length rises with the reward: check the answers for padding (length hacking)."
    return text + ("" if suspicious else "."), suspicious


def _grid(page: report_page.Page, metrics: list[dict], keys: list[str], name: str, caption: str) -> None:
    """Small multiples: one panel per key."""
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)

    def draw(figure, axes):
        for ax, key in zip(axes, keys):
            _lines(ax, metrics, [key], key)
        for ax in axes[len(keys):]:
            ax.set_visible(False)

    page.figure(name, draw, caption, width=4.0 * cols, height=2.8 * rows, rows=rows, cols=cols)


def _learner(page: report_page.Page, metrics: list[dict], keys: list[str]) -> set[str]:
    kl = [k for k in keys if "kl" in k.lower() and (k.startswith("learner.") or k.startswith("kl"))]
    clip = [k for k in keys if "clip_frac" in k]
    ratio = [k for k in keys if k.startswith("learner.") and ("ratio" in k or "entropy" in k or "is_weight" in k)]
    if not (kl or clip or ratio):
        return set()
    page.section("KL and clipping")
    if kl or clip:
        def draw(figure, axes):
            if kl:
                _lines(axes[0], metrics, kl, "KL estimates")
            else:
                axes[0].set_visible(False)
            if clip:
                _lines(axes[1], metrics, clip, "Clip fraction")
            else:
                axes[1].set_visible(False)

        page.figure("kl_clip.png", draw, "KL to the behaviour/reference policy and the share of clipped "
                                         "importance ratios.", width=10.0, cols=2)
    if ratio:
        _grid(page, metrics, ratio, "ratios.png", "Importance ratios, truncated-IS weights and entropy.")
    return set(kl + clip + ratio)


def _judge(page: report_page.Page, metrics: list[dict], keys: list[str]) -> set[str]:
    judge = [k for k in keys if k.startswith("judge.")]
    if not judge:
        return set()
    page.section("Judge")
    _grid(page, metrics, judge, "judge.png", "Every judge.* metric of the run: parse failures, invalid share, "
                                             "agreement between repeats and whatever else the judge logs.")
    failures = [m.get("judge.parse_failures") for m in metrics if _finite(m.get("judge.parse_failures"))]
    judged = [m.get("judge.judgements") for m in metrics if _finite(m.get("judge.judgements"))]
    if failures and judged and sum(judged):
        page.text(f"Parse failures: {sum(failures):.0f} of {sum(judged):.0f} judgements "
                  f"({100 * sum(failures) / sum(judged):.1f}%).")
    return set(judge)


def _prompts(page: report_page.Page, run_dir: Path, metrics: list[dict], keys: list[str], out: Path) -> set[str]:
    prompt_keys = [k for k in keys if k.startswith("prompts.")]
    generated = (run_dir / "prompts").is_dir() and any((run_dir / "prompts").glob("*.parquet"))
    report_dir = run_dir / "data_report"
    if generated and not (report_dir / "summary.json").is_file():
        try:
            from dynalign.data_report import data_report

            data_report(run_dir, max_pairs=20_000)
        except Exception as err:  # the rest of the report still stands
            log.warning("data report not written (%s)", _one_line(err))
    figures = sorted(report_dir.glob("*.png")) if report_dir.is_dir() else []
    if not (prompt_keys or figures):
        return set()
    page.section("Prompt diversity")
    if prompt_keys:
        _grid(page, metrics, prompt_keys, "prompts.png", "Prompt source metrics per iteration (prompts.*).")
    if figures:
        target = out / "data_report"
        target.mkdir(exist_ok=True)
        # The overview and the whole-run figures first; per-iteration ones after.
        figures.sort(key=lambda p: (p.name != "overview.png", "_all" not in p.name, p.name))
        for figure in figures:
            shutil.copyfile(figure, target / figure.name)
            page.add_image(f"data_report/{figure.name}", f"dynalign data-report: {figure.stem}")
        summary = report_dir / "summary.json"
        if summary.is_file():
            try:
                overall = json.loads(summary.read_text()).get("overall", {})
                rouge = overall.get("pairwise_rouge_l", {})
                page.text(f"{overall.get('kept', '?')} prompts kept; pairwise ROUGE-L mean "
                          f"{report_page.cell(rouge.get('mean'))}, p95 {report_page.cell(rouge.get('p95'))}.")
            except (json.JSONDecodeError, AttributeError):
                pass
    elif generated:
        page.text("Run `dynalign data-report RUN_DIR` for the prompt diversity figures.", "muted")
    return set(prompt_keys)


def _others(page: report_page.Page, metrics: list[dict], keys: list[str], shown: set[str]) -> None:
    rest = [k for k in keys if k not in shown]
    if not rest:
        return
    page.section("Other metrics")
    groups: dict[str, list[str]] = {}
    for key in rest:
        groups.setdefault(key.split(".")[0] if "." in key else "run", []).append(key)
    for name, group in groups.items():
        _grid(page, metrics, group, f"other_{_safe(name)}.png", f"{name}: {len(group)} metric(s)")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _table_of_all(page: report_page.Page, metrics: list[dict], keys: list[str]) -> None:
    page.section("All metrics")
    rows = []
    for key in keys:
        _, y = series(metrics, key)
        rows.append((key, y[0], y[-1], min(y), max(y)))
    page.table(("metric", "first", "last", "min", "max"), rows)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``index.html`` and its PNGs (default ``RUN_DIR/report``); returns the HTML path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"report {run_dir}: no such directory; give a run directory (run_dir of `train`)")
    metrics = _jsonl(run_dir / "metrics.jsonl")
    has_eval = (run_dir / "eval").is_dir() and any((run_dir / "eval").glob("*.json"))
    if not metrics and not has_eval:
        raise ConfigError(f"report {run_dir}: no metrics.jsonl and no eval results there; is it a run directory?")
    out = writable_dir("report --out", out_dir) if out_dir is not None else writable_dir("report RUN_DIR", run_dir / "report")
    for stale in out.glob("*.png"):  # figures of an earlier report that this one may not redraw
        stale.unlink()
    page = report_page.Page(out)
    keys = numeric_keys(metrics)
    _overview(page, run_dir, metrics)
    report_eval.evaluations(page, run_dir)  # the headline: more aligned? still capable?
    shown = _reward(page, metrics)
    _scores(page, run_dir)
    shown |= _length(page, metrics)
    shown |= _learner(page, metrics, keys)
    shown |= _judge(page, metrics, keys)
    shown |= _prompts(page, run_dir, metrics, keys, out)
    _others(page, metrics, keys, shown)
    if keys:
        _table_of_all(page, metrics, keys)
    return page.write(f"dynalign run report: {run_dir.name}")


def write_report_safely(run_dir: str | Path) -> Path | None:
    """``write_report`` for the end of ``train``: a failure warns on one line instead of failing
    the finished run."""
    try:
        path = write_report(run_dir)
    except Exception as err:
        log.warning("run report not written (%s: %s)", type(err).__name__, _one_line(err))
        return None
    print(f"report:  {path}")
    return path
