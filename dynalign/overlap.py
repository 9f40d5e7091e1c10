"""Off-policy overlap (``rollout.max_staleness``): the next iteration's groups are generated and
judged on the engines while the learner steps on this iteration's (verl's one-step-off).

With ``max_staleness = 0`` every iteration's groups are produced on the spot, by the weights the
learner holds (synchronous GRPO). With ``max_staleness >= 1``, while the learner steps on iteration
k (weights version k), a background thread produces iteration k+1's on the engines, which still
hold version k; the sync to version k+1 waits for it. Iteration k+1 so trains on groups one version
old; the learner's truncated importance sampling against the engines' behaviour log-probs corrects
for it. Versions are what the engines report (syncs so far): the learner before iteration k's step
holds version k, so a group's staleness there is ``k - group.generation_version``. A group staler
than ``max_staleness`` (e.g. groups a checkpoint kept, resumed with a smaller bound) is dropped and
its prompt generated and judged again, never trained on silently.

Judge rule (self-rewarding on shared engines): a group is judged by the same engine weights that
generated it, since the judge runs right after generation, before the sync. Both versions are
recorded on the group.

The groups produced ahead are part of the checkpoint (``rollouts_ahead.jsonl``), so a resume or a
learner restart trains on exactly the groups the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from dynalign.batch import Candidate, Group

log = logging.getLogger(__name__)

AHEAD_FILE = "rollouts_ahead.jsonl"  # in a checkpoint: the groups produced ahead, one line per group, then the stats


@dataclass
class ScoredRollouts:
    """One iteration's generated and judged groups, with the metrics of producing them."""

    iteration: int
    groups: list[Group]
    stats: dict[str, float]


def staleness(groups: list[Group], learner_version: int) -> list[int]:
    """How many versions behind the learner each group's generating weights are."""
    return [learner_version - group.generation_version for group in groups]


def staleness_stats(groups: list[Group], learner_version: int, dropped: int) -> dict[str, float]:
    ages = staleness(groups, learner_version)
    judged = [g.judge_version for g in groups if g.judge_version is not None]
    stats = {"staleness.mean": sum(ages) / max(len(ages), 1), "staleness.max": float(max(ages, default=0)),
             "staleness.dropped": float(dropped),
             "version.generation_min": float(min((g.generation_version for g in groups), default=0))}
    if judged:  # a judge with the policy's weights: which of them judged
        stats["version.judge_min"] = float(min(judged))
        stats["version.judge_mismatch"] = float(sum(g.judge_version != g.generation_version for g in groups
                                                    if g.judge_version is not None))
    return stats


class RolloutsAhead:
    """Each iteration's groups: produced ahead in a background thread (``start``, during the
    learner step before), or on the spot (``get``). ``produce(iteration, prompts)`` runs steps
    1-3 (prompts, generate, judge); ``prompts`` is None for the iteration's own prompts, or the
    (id, text) pairs of dropped groups to generate again."""

    def __init__(self, produce: Callable[[int, list[tuple[str, str]] | None], ScoredRollouts], max_staleness: int):
        self.produce, self.max_staleness = produce, max_staleness
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollouts-ahead") if max_staleness else None
        self.pending: Future | None = None
        self.ready: ScoredRollouts | None = None

    def start(self, iteration: int) -> None:
        """With max_staleness >= 1: produce ``iteration``'s groups in the background, now."""
        if self.executor is not None:
            self.pending = self.executor.submit(self.produce, iteration, None)

    def finish(self) -> None:
        """Wait for the groups in production (before the engines get new weights); an error there is raised here."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.ready = pending.result()

    def get(self, iteration: int) -> ScoredRollouts:
        """``iteration``'s groups, produced ahead or now, every one at most max_staleness versions
        behind the learner (which holds version ``iteration``), with the staleness metrics."""
        self.finish()
        ahead, self.ready = self.ready, None
        if ahead is None or ahead.iteration != iteration:
            if ahead is not None:
                log.warning("discarding groups produced ahead for iteration %d (now at %d)", ahead.iteration, iteration)
            scored = self.produce(iteration, None)
            return dataclasses.replace(scored, stats={**scored.stats, **staleness_stats(scored.groups, iteration, 0)})
        # Groups produced ahead come from one set of weights (one call between two syncs): all
        # of them are within the bound or none is.
        dropped = 0
        if max(staleness(ahead.groups, iteration), default=0) > self.max_staleness:
            dropped = sum(len(g.candidates) for g in ahead.groups)
            log.warning("iteration %d: %d group(s) generated by weights more than rollout.max_staleness = %d versions "
                        "old; dropped, their prompts generated and judged again", iteration, len(ahead.groups),
                        self.max_staleness)
            again = self.produce(iteration, [(g.prompt_id, g.prompt) for g in ahead.groups])
            ahead = ScoredRollouts(iteration, again.groups, {**ahead.stats, **again.stats})
        return dataclasses.replace(ahead, stats={**ahead.stats, **staleness_stats(ahead.groups, iteration, dropped)})

    def discard(self) -> None:
        """Forget what was produced ahead (a learner restart replays from a checkpoint); waits for
        the background work, whose engines the rewind is about to sync."""
        try:
            self.finish()
        except Exception as err:  # produced for an iteration that is replayed anyway
            log.warning("groups produced ahead failed (%s); replaying from the checkpoint", err)
        self.ready = None

    # -- checkpoint -----------------------------------------------------------------------------
    def state(self) -> list[dict]:
        """JSON records of the groups produced ahead (after ``finish``): the checkpoint keeps them."""
        if self.ready is None:
            return []
        return [{"group": group_record(g)} for g in self.ready.groups] + [
            {"iteration": self.ready.iteration, "stats": self.ready.stats}]

    def restore(self, records: list[dict]) -> None:
        """Back to what ``state`` recorded (an empty list: nothing produced ahead)."""
        self.ready = None
        if records:
            *groups, tail = records
            self.ready = ScoredRollouts(tail["iteration"], [group_from_record(r["group"]) for r in groups], tail["stats"])

    def close(self) -> None:
        if self.executor is not None:
            self.discard()
            self.executor.shutdown()


def group_record(group: Group) -> dict:
    """A group as JSON (floats round-trip exactly); the judge's per-slot values (tuple keys) stay out."""
    record = dataclasses.asdict(group)
    record["judge_info"] = {k: v for k, v in group.judge_info.items() if k != "values"}
    return record


def group_from_record(record: dict) -> Group:
    return Group(**{**record, "candidates": [Candidate(**c) for c in record["candidates"]]})
