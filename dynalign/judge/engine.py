"""The judge on a vLLM engine (actor side): ``JudgeMixin`` lets any ``EngineWorker`` judge (the
rollout actors do, for ``judge.engine=shared``); ``JudgeWorker`` is a judge-only engine actor."""

from __future__ import annotations

import copy
import math

from dynalign.config import ConfigError, JudgeConfig, TrainConfig
from dynalign.engine import EngineWorker
from dynalign.judge.jobs import (
    Job,
    JudgeMode,
    JudgeRequestError,
    Slot,
    new_counts,
    per_group,
    run_jobs,
)
from dynalign.judge.prompts import render, score_label
from dynalign.value import ValueSpec


class JudgeMixin:
    """Judging on this actor's vLLM engine. Mix into an ``EngineWorker`` subclass (before it in
    the bases). ``judge_groups`` takes the judge mode (config and spec) per call, so the same
    engine can sample rollouts and judge them."""

    def __init__(self, config: TrainConfig, name: str, seed: int, max_model_len: int | None = None):
        if max_model_len is None and config.judge.uses_shared_engines:
            # The rollout engine also reads judge prompts: give it the judge's context length.
            max_model_len = max(config.rollout.max_model_len, config.judge.max_model_len)
        self.judge_context = max_model_len or config.rollout.max_model_len
        self._score_token_cache: dict = {}
        super().__init__(config, name, seed, max_model_len=max_model_len)

    def judge_groups(self, items: list[tuple[str, list[str]]], mode: JudgeMode, seed: int) -> list[dict]:
        """Judge groups given as (question, [answer texts]); per group {values, counters}."""
        jobs = mode.plan(items, seed, self._special_tokens())
        if mode.reads_distribution:
            values, counts = self._expected_scores(jobs, mode.judge, len(items))
        else:
            values, counts = run_jobs(jobs, lambda asked, s: self._sample(asked, s, mode.judge), mode.judge, seed,
                                      len(items))
        return per_group(values, counts)

    def judge_prompt_token_ids(self, question: str, answer: str, judge: JudgeConfig, spec: ValueSpec,
                               pillar: str | None = None) -> list[int]:
        """The exact token ids the logprob mode scores (chat template + score prefix); for checks."""
        messages = render(spec, judge, "logprob", question=question, answer=answer,
                          special_tokens=self._special_tokens())
        return self.chat_token_ids(messages) + self.tokenizer.encode(score_label(pillar), add_special_tokens=False)

    def judge_score_tokens(self, judge: JudgeConfig) -> dict[int, list[int]]:
        key = (judge.score_min, judge.score_max)
        if key not in self._score_token_cache:
            self._score_token_cache[key] = score_token_ids(self.tokenizer, judge.score_min, judge.score_max)
        return self._score_token_cache[key]

    def _special_tokens(self) -> list[str]:
        return list(getattr(self.tokenizer, "all_special_tokens", []) or [])

    def _expected_scores(self, jobs: list[Job], judge: JudgeConfig, groups: int) -> tuple[dict, list[dict]]:
        """logprob mode: E[score] under the next-token distribution right after each slot's score
        prefix, renormalised over the score tokens (vLLM masks to ``allowed_token_ids``; processed
        log-probs). A prompt too long for the engine is an error; no score mass a parse failure."""
        from vllm import SamplingParams

        tokens = self.judge_score_tokens(judge)
        allowed = sorted({t for ids in tokens.values() for t in ids})
        prefixes: dict = {}
        counts = new_counts(groups)
        prompts, keys = [], []
        for job in jobs:
            base = self.chat_token_ids(job.messages)
            stats = counts[job.group]
            for slot in job.slots:
                pillar = slot[3]
                if pillar not in prefixes:
                    prefixes[pillar] = self.tokenizer.encode(score_label(pillar), add_special_tokens=False)
                ids = base + prefixes[pillar]
                stats["judgements"] += 1
                stats["attempts"] += 1
                if len(ids) + 1 > self.judge_context:
                    stats["errors"] += 1
                    stats["error"] = (f"judge prompt of {len(ids)} tokens does not fit the engine's "
                                      f"max_model_len {self.judge_context}")
                    continue
                prompts.append({"prompt_token_ids": ids})
                keys.append(slot)
        values: dict[Slot, float] = {}
        if prompts:
            params = SamplingParams(n=1, max_tokens=1, temperature=1.0, logprobs=len(allowed), allowed_token_ids=allowed)
            for key, output in zip(keys, self.llm.generate(prompts, params, use_tqdm=False)):
                top = output.outputs[0].logprobs[0]
                mass = {value: sum(math.exp(top[t].logprob) for t in ids if t in top) for value, ids in tokens.items()}
                total = sum(mass.values())
                if total > 0:
                    values[key] = sum(v * m for v, m in mass.items()) / total
                else:
                    counts[key[0]]["parse_failures"] += 1
        return values, counts

    def _sample(self, jobs: list[Job], seed: int, judge: JudgeConfig) -> list:
        """generate/group mode: one sampled output per job; prompts too long for the engine fail (not retried)."""
        from vllm import SamplingParams

        outputs: list = [None] * len(jobs)
        prompts, params, index = [], [], []
        for i, job in enumerate(jobs):
            ids = self.chat_token_ids(job.messages)
            room = self.judge_context - len(ids)
            if room < 2:
                outputs[i] = JudgeRequestError(f"judge prompt of {len(ids)} tokens does not fit the engine's "
                                               f"max_model_len {self.judge_context}", retryable=False)
                continue
            prompts.append({"prompt_token_ids": ids})
            params.append(SamplingParams(n=1, max_tokens=min(job.max_tokens, room), temperature=judge.temperature,
                                         seed=seed + i))
            index.append(i)
        if prompts:
            for i, output in zip(index, self.llm.generate(prompts, params, use_tqdm=False)):
                outputs[i] = output.outputs[0].text
        return outputs


class JudgeWorker(JudgeMixin, EngineWorker):
    """A judge-only engine actor: the policy's weights (``dedicated``) or a fixed model (``external_vllm``)."""

    def __init__(self, config: TrainConfig, name: str, seed: int):
        if config.judge.kind == "external_vllm":
            config = copy.deepcopy(config)
            config.model.path = config.judge.model_path
        super().__init__(config, name, seed, max_model_len=config.judge.max_model_len)


def score_token_ids(tokenizer, score_min: int, score_max: int) -> dict[int, list[int]]:
    """Single-token spellings ('3', ' 3') of every score on the scale."""
    tokens = {}
    for value in range(score_min, score_max + 1):
        ids = {tuple(tokenizer.encode(s, add_special_tokens=False)) for s in (str(value), f" {value}")}
        tokens[value] = sorted(t[0] for t in ids if len(t) == 1)
        if not tokens[value]:
            raise ConfigError(f"judge.score_max = {score_max}: score {value} is not a single token for this "
                              "tokenizer; use judge.mode=generate or a smaller scale")
    if sum(len(ids) for ids in tokens.values()) > 20:
        raise ConfigError(f"judge.score_min..score_max = {score_min}..{score_max}: more than 20 score tokens, "
                          "beyond vLLM's default max_logprobs; use a smaller scale or judge.mode=generate")
    return tokens
