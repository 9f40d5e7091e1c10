"""Judgements as jobs (backend independent): ``judge.mode`` decoded once into a ``JudgeMode`` that
knows how many judgements (slots) a candidate gets and which requests fill them; ``run_jobs`` asks
them and re-asks the ones left unread."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dynalign.config import JudgeConfig
from dynalign.judge.parse import parse_group_scores, parse_score
from dynalign.judge.prompts import render
from dynalign.value import ValueSpec


class JudgeRequestError(RuntimeError):
    """A judgement request that produced no output (timeout, connection, HTTP error, too long)."""

    def __init__(self, message: str, retryable: bool = True):
        super().__init__(message)
        self.retryable = retryable


Slot = tuple  # (group index, candidate index, repeat, pillar or None)
Items = Sequence[tuple[str, Sequence[str]]]  # groups as (question, answers)


@dataclass
class Job:
    """One request to the judge; its output fills ``slots`` (one judgement each)."""

    messages: list[dict]
    slots: list[Slot]
    parse: Callable[[str | None], dict] | None  # judge output -> {slot: value} it could read; None: logprob
    max_tokens: int
    group: int


# A backend: (jobs, seed) -> one output per job: its text, or a JudgeRequestError.
Complete = Callable[[list[Job], int], list]


# ---------------------------------------------------------------------------------------------
# Modes: how many judgements a candidate gets, and the requests that ask for them
# ---------------------------------------------------------------------------------------------

@dataclass
class JudgeMode:
    """``judge.mode`` with the judge config and value spec it applies to; built once by
    ``judge_mode`` (driver side) and sent to the engines with each call."""

    judge: JudgeConfig
    spec: ValueSpec
    reads_distribution = False  # logprob: the score is read from the next-token distribution, not sampled text

    @property
    def repeats(self) -> int:
        return self.judge.repeats

    @property
    def pillars(self) -> list[str | None]:
        return list(self.spec.pillar_names()) if self.judge.per_pillar else [None]

    @property
    def slots_per_candidate(self) -> int:
        return self.repeats * len(self.pillars)

    def plan(self, items: Items, seed: int, special_tokens: Sequence[str] = ()) -> list[Job]:
        """The requests for groups given as (question, answers)."""
        jobs = []
        for g, (question, answers) in enumerate(items):
            jobs += self.plan_group(g, question, answers, seed, special_tokens)
        return jobs

    def plan_group(self, g: int, question: str, answers: Sequence[str], seed: int,
                   special_tokens: Sequence[str]) -> list[Job]:
        raise NotImplementedError


class LogprobMode(JudgeMode):
    """One job per candidate; the engine scores each pillar's score prefix in one forward pass."""

    reads_distribution = True

    @property
    def repeats(self) -> int:
        return 1  # deterministic

    def plan_group(self, g, question, answers, seed, special_tokens):
        return [Job(render(self.spec, self.judge, "logprob", question=question, answer=answer,
                           special_tokens=special_tokens), [(g, c, 0, p) for p in self.pillars], None, 1, g)
                for c, answer in enumerate(answers)]


class GenerateMode(JudgeMode):
    """``repeats`` sampled judgements per candidate, each ending in 'Score: N' (one per pillar)."""

    def plan_group(self, g, question, answers, seed, special_tokens):
        lo, hi = self.judge.score_min, self.judge.score_max
        jobs = []
        for c, answer in enumerate(answers):
            messages = render(self.spec, self.judge, "generate", question=question, answer=answer,
                              special_tokens=special_tokens)
            for r in range(self.judge.repeats):
                slots = [(g, c, r, p) for p in self.pillars]
                jobs.append(Job(messages, slots, _single_parser(slots, lo, hi), self.judge.max_new_tokens, g))
        return jobs


class GroupMode(JudgeMode):
    """All candidates of a group in one prompt per repeat, in a seeded order that changes per repeat."""

    def plan_group(self, g, question, answers, seed, special_tokens):
        lo, hi, pillars = self.judge.score_min, self.judge.score_max, self.pillars
        jobs = []
        for r, order in enumerate(group_orders(len(answers), self.judge.repeats, seed + 7919 * g)):
            messages = render(self.spec, self.judge, "group", question=question, answers=[answers[i] for i in order],
                              special_tokens=special_tokens)
            slots = [(g, c, r, p) for c in range(len(answers)) for p in pillars]
            budget = self.judge.max_new_tokens + 16 * len(answers) * len(pillars)
            jobs.append(Job(messages, slots, _group_parser(g, r, order, pillars, lo, hi), budget, g))
        return jobs


def judge_mode(judge: JudgeConfig, spec: ValueSpec) -> JudgeMode:
    """Decode ``judge.mode``."""
    return {"logprob": LogprobMode, "generate": GenerateMode, "group": GroupMode}[judge.mode](judge, spec)


def group_orders(count: int, repeats: int, seed: int) -> list[list[int]]:
    """Candidate order shown in each repeat: a seeded shuffle, then its reverse, then a fresh
    shuffle, ... so first and last positions trade places between pairs of repeats."""
    rng = random.Random(seed)
    orders = []
    for r in range(repeats):
        if r % 2:
            orders.append(orders[-1][::-1])
        else:
            order = list(range(count))
            rng.shuffle(order)
            orders.append(order)
    return orders


def _single_parser(slots: list[Slot], lo: int, hi: int):
    def parse(text):
        found = {}
        for slot in slots:
            value = parse_score(text, lo, hi, slot[3])
            if value is not None:
                found[slot] = value
        return found
    return parse


def _group_parser(g: int, r: int, order: list[int], pillars: list, lo: int, hi: int):
    def parse(text):
        found = {}
        for p in pillars:
            for position, value in enumerate(parse_group_scores(text, len(order), lo, hi, p)):
                if value is not None:
                    found[(g, order[position], r, p)] = value
        return found
    return parse


# ---------------------------------------------------------------------------------------------
# Asking and re-asking
# ---------------------------------------------------------------------------------------------

def new_counts(groups: int) -> list[dict]:
    """Per-group counters of a judge call."""
    return [{"judgements": 0, "attempts": 0, "parse_failures": 0, "errors": 0, "retries": 0,
             "error": "", "unparsed_example": ""} for _ in range(groups)]


def run_jobs(jobs: list[Job], complete: Complete, judge: JudgeConfig, seed: int, groups: int) -> tuple[dict, list[dict]]:
    """Ask every job; re-ask the ones with slots still unread, up to ``judge.max_retries`` times
    (after a back-off when requests failed). Returns {slot: value} and per-group counters."""
    values: dict = {}
    counts = new_counts(groups)
    for job in jobs:
        counts[job.group]["judgements"] += len(job.slots)
    pending = list(range(len(jobs)))
    for attempt in range(judge.max_retries + 1):
        if not pending:
            break
        outputs = complete([jobs[i] for i in pending], seed + 1_000_003 * attempt)
        retry, failed_requests = [], False
        for index, output in zip(pending, outputs):
            job, stats = jobs[index], counts[jobs[index].group]
            missing = [s for s in job.slots if s not in values]
            stats["attempts"] += len(missing)
            retryable = True
            if isinstance(output, BaseException):
                stats["errors"] += len(missing)
                stats["error"] = one_line(f"{type(output).__name__}: {output}")
                retryable = getattr(output, "retryable", True)
                failed_requests = True
            else:
                found = job.parse(output)
                for slot in missing:
                    if slot in found:
                        values[slot] = found[slot]
                    else:
                        stats["parse_failures"] += 1
                        stats["unparsed_example"] = stats["unparsed_example"] or one_line(output or "")[:160]
            if retryable and any(s not in values for s in job.slots):
                retry.append(index)
        if retry and attempt < judge.max_retries:
            for index in retry:
                counts[jobs[index].group]["retries"] += 1
            if failed_requests and judge.retry_backoff_s > 0:
                time.sleep(min(judge.retry_backoff_s * 2**attempt, 30.0))
        pending = retry
    return values, counts


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def per_group(values: dict, counts: list[dict]) -> list[dict]:
    """Per group {values: {(candidate, repeat, pillar): score}, **counters}."""
    infos = [{"values": {}, **c} for c in counts]
    for (g, c, r, p), value in values.items():
        infos[g]["values"][(c, r, p)] = value
    return infos


def judge_text_groups(items: Items, judge: JudgeConfig, spec: ValueSpec, seed: int, complete: Complete,
                      special_tokens: Sequence[str] = ()) -> list[dict]:
    """Generate/group mode for any backend: per group {values, counters}."""
    jobs = judge_mode(judge, spec).plan(items, seed, special_tokens)
    values, counts = run_jobs(jobs, complete, judge, seed, len(items))
    return per_group(values, counts)
