"""From judgements to rewards: repeats and pillars summarised per candidate, optional length
shaping, and the judge's health metrics (logged as ``judge.*``)."""

from __future__ import annotations

import math

from dynalign.batch import Group
from dynalign.config import JudgeConfig
from dynalign.judge.jobs import judge_mode
from dynalign.stats import mean, pstd, spearman
from dynalign.value import ValueSpec


def aggregate_pillars(scores: dict[str, float], judge: JudgeConfig, weights: dict[str, float]) -> float:
    """One score from per-pillar scores: weighted mean (``rubric.pillar_weights``, default 1) or min."""
    if not scores or any(math.isnan(v) for v in scores.values()):
        return math.nan
    if judge.pillar_aggregation == "min":
        return min(scores.values())
    w = {p: weights.get(p, 1.0) for p in scores}
    total = sum(w.values())
    return sum(w[p] * v for p, v in scores.items()) / total if total > 0 else math.nan


def summarize_judgements(info: dict, count: int, judge: JudgeConfig, spec: ValueSpec) -> dict:
    """Per candidate: ``score`` (mean over valid repeats; pillars aggregated; NaN = invalid),
    ``repeat_scores`` (one per repeat, NaN where unread) and ``pillar_scores``."""
    values = info["values"]
    mode = judge_mode(judge, spec)
    repeats, pillars = mode.repeats, mode.pillars
    per_repeat = [[[values.get((c, r, p), math.nan) for r in range(repeats)] for p in pillars] for c in range(count)]
    scores, repeat_scores, pillar_scores = [], [], {p: [] for p in pillars if p is not None}
    for c in range(count):
        means = {p: mean([v for v in per_repeat[c][i] if not math.isnan(v)]) for i, p in enumerate(pillars)}
        if judge.per_pillar:
            for p, v in means.items():
                pillar_scores[p].append(v)
            scores.append(aggregate_pillars(means, judge, spec.rubric.pillar_weights))
            repeat_scores.append([aggregate_pillars({p: per_repeat[c][i][r] for i, p in enumerate(pillars)}, judge,
                                                    spec.rubric.pillar_weights) for r in range(repeats)])
        else:
            scores.append(means[None])
            repeat_scores.append(per_repeat[c][0])
    return {"score": scores, "repeat_scores": repeat_scores, "pillar_scores": pillar_scores}


def shape_rewards(groups: list[Group], judge: JudgeConfig, max_new_tokens: int) -> None:
    """Optional length control on ``group.rewards`` (the judge's scores stay in judge_info):
    ``penalty``: minus length_coef * length / rollout.max_new_tokens;
    ``regress``: minus the batch's least-squares trend of score on length, when it is positive
    (longer answers scored higher), so length no longer predicts reward in the batch."""
    if judge.length_control == "none":
        return
    pairs = [(len(c.token_ids), r) for g in groups for c, r in zip(g.candidates, g.rewards) if not math.isnan(r)]
    slope, mean_length = 0.0, mean([n for n, _ in pairs]) if pairs else 0.0
    if judge.length_control == "regress" and len(pairs) >= 2:
        mean_reward = mean([r for _, r in pairs])
        var = sum((n - mean_length) ** 2 for n, _ in pairs)
        slope = max(0.0, sum((n - mean_length) * (r - mean_reward) for n, r in pairs) / var) if var > 0 else 0.0
    for group in groups:
        shaped = []
        for candidate, reward in zip(group.candidates, group.rewards):
            length = len(candidate.token_ids)
            if judge.length_control == "penalty":
                reward = reward - judge.length_coef * length / max_new_tokens
            else:
                reward = reward - slope * (length - mean_length)
            shaped.append(reward)
        group.rewards = shaped



def judge_metrics(groups: list[Group], judge: JudgeConfig) -> dict[str, float]:
    """Health of the judge over ``groups`` (flat floats; the driver logs them as ``judge.*``):
    request and parse counters and rates, invalid share, score mean/std and histogram (counts
    per integer bin), within-group std, share of groups whose scores all tie, Spearman of score
    with length, agreement between repeated judgements, per-pillar means."""
    infos = [g.judge_info or {"score": list(g.rewards)} for g in groups]
    counters = {k: float(sum(i.get(k, 0) for i in infos))
                for k in ("judgements", "attempts", "parse_failures", "errors", "retries")}
    answered = counters["attempts"] - counters["errors"]
    raw = [(s, len(c.token_ids)) for g, i in zip(groups, infos) for s, c in zip(i.get("score", g.rewards), g.candidates)]
    valid = [(s, n) for s, n in raw if not math.isnan(s)]
    scores = [s for s, _ in valid]
    metrics = {
        **counters,
        "parse_failure_rate": counters["parse_failures"] / answered if answered > 0 else 0.0,
        "error_rate": counters["errors"] / counters["attempts"] if counters["attempts"] else 0.0,
        "candidates": float(len(raw)),
        "invalid": float(len(raw) - len(valid)),
        "invalid_rate": (len(raw) - len(valid)) / len(raw) if raw else 0.0,
        "score_mean": mean(scores),
        "score_std": pstd(scores) if scores else math.nan,
    }
    for value in range(judge.score_min, judge.score_max + 1):
        metrics[f"score_hist.{value}"] = 0.0
    for s in scores:
        key = f"score_hist.{min(max(round(s), judge.score_min), judge.score_max)}"
        metrics[key] = metrics.get(key, 0.0) + 1
    stds, tied = [], 0
    for g, i in zip(groups, infos):
        group_scores = [s for s in i.get("score", g.rewards) if not math.isnan(s)]
        if len(group_scores) >= 2:
            stds.append(pstd(group_scores))
        tied += len(group_scores) < 2 or max(group_scores) == min(group_scores)
    metrics["within_group_std"] = mean(stds)
    metrics["tied_group_share"] = tied / len(groups) if groups else 0.0
    metrics["length_spearman"] = spearman([n for _, n in valid], scores)
    if judge.length_control != "none":
        shaped = [(r, len(c.token_ids)) for g in groups for r, c in zip(g.rewards, g.candidates) if not math.isnan(r)]
        metrics["shaped_length_spearman"] = spearman([n for _, n in shaped], [r for r, _ in shaped])
    metrics.update(repeat_agreement([r for i in infos for r in i.get("repeat_scores", [])]))
    for pillar in (infos[0].get("pillar_scores") or {}) if infos else {}:
        values = [v for i in infos for v in i["pillar_scores"].get(pillar, []) if not math.isnan(v)]
        metrics[f"pillar.{pillar}"] = mean(values)
    return metrics


def repeat_agreement(repeat_scores: list[list[float]]) -> dict[str, float]:
    """Agreement between repeated judgements of the same candidates: share of pairs of repeats
    that give the same integer score, their mean absolute difference, and the Spearman
    correlation of repeat 1 with repeat 2 across candidates. NaN without repeats."""
    same = pairs = 0
    diffs, first, second = [], [], []
    for scores in repeat_scores:
        valid = [s for s in scores if not math.isnan(s)]
        for a in range(len(valid)):
            for b in range(a + 1, len(valid)):
                pairs += 1
                same += round(valid[a]) == round(valid[b])
                diffs.append(abs(valid[a] - valid[b]))
        if len(scores) >= 2 and not math.isnan(scores[0]) and not math.isnan(scores[1]):
            first.append(scores[0])
            second.append(scores[1])
    return {"repeat_exact_agreement": same / pairs if pairs else math.nan,
            "repeat_mean_abs_diff": mean(diffs),
            "repeat_spearman": spearman(first, second)}


def log_score_histogram(writer, groups: list[Group], step: int) -> None:
    """TensorBoard histogram of the judge's scores (before length shaping) of ``groups``."""
    if writer is None:
        return
    scores = [s for g in groups for s in (g.judge_info or {}).get("score", g.rewards) if not math.isnan(s)]
    if scores:
        import numpy as np

        writer.add_histogram("judge/scores", np.asarray(scores, dtype=np.float64), step)
        writer.flush()
