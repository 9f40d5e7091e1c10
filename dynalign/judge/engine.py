"""The judge on a vLLM engine (actor side): ``JudgeMixin`` lets any ``EngineWorker`` judge (the
rollout actors do, for ``judge.engine=shared``); ``JudgeWorker`` is a judge-only engine actor."""

from __future__ import annotations

from dynalign.config import ConfigError, JudgeConfig
from dynalign.engine import EngineSpec, EngineWorker, expected_value
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
    engine can sample rollouts and judge them. Judge prompts must fit the engine's
    ``max_model_len`` (``EngineSpec.rollout`` gives a shared engine the judge's)."""

    def __init__(self, spec: EngineSpec, name: str, seed: int):
        self._score_token_cache: dict = {}
        super().__init__(spec, name, seed)

    def judge_groups(self, items: list[tuple[str, list[str]]], mode: JudgeMode, seed: int) -> list[dict]:
        """Judge groups given as (question, [answer texts]); per group {values, counters}."""
        jobs = mode.plan(items, seed, self.special_tokens)
        if mode.reads_distribution:
            values, counts = self._expected_scores(jobs, mode.judge, len(items))
        else:
            values, counts = run_jobs(jobs, lambda asked, s: self._sample(asked, s, mode.judge), mode.judge, seed,
                                      len(items))
        # Which weights judged: the driver records it on each group (self-rewarding's judge rule).
        return [{**info, "weight_version": self.weight_version} for info in per_group(values, counts)]

    def judge_prompt_token_ids(self, question: str, answer: str, judge: JudgeConfig, spec: ValueSpec,
                               pillar: str | None = None) -> list[int]:
        """The exact token ids the logprob mode scores (chat template + score prefix); for checks."""
        messages = render(spec, judge, "logprob", question=question, answer=answer,
                          special_tokens=self.special_tokens)
        return self.chat_token_ids(messages) + self.tokenizer.encode(score_label(pillar), add_special_tokens=False)

    def judge_score_tokens(self, judge: JudgeConfig) -> dict[int, list[int]]:
        key = (judge.score_min, judge.score_max)
        if key not in self._score_token_cache:
            self._score_token_cache[key] = score_token_ids(self.tokenizer, judge.score_min, judge.score_max)
        return self._score_token_cache[key]

    def _expected_scores(self, jobs: list[Job], judge: JudgeConfig, groups: int) -> tuple[dict, list[dict]]:
        """logprob mode: E[score] under the next-token distribution right after each slot's score
        prefix, renormalised over the score tokens (``next_token_mass``). A prompt too long for
        the engine is an error; no score mass a parse failure."""
        tokens = self.judge_score_tokens(judge)
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
                if len(ids) + 1 > self.max_model_len:
                    stats["errors"] += 1
                    stats["error"] = (f"judge prompt of {len(ids)} tokens does not fit the engine's "
                                      f"max_model_len {self.max_model_len}")
                    continue
                prompts.append(ids)
                keys.append(slot)
        values: dict[Slot, float] = {}
        for key, mass in zip(keys, self.next_token_mass(prompts, tokens) if prompts else []):
            value = expected_value(mass)
            if value is not None:
                values[key] = value
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
            room = self.max_model_len - len(ids)
            if room < 2:
                outputs[i] = JudgeRequestError(f"judge prompt of {len(ids)} tokens does not fit the engine's "
                                               f"max_model_len {self.max_model_len}", retryable=False)
                continue
            prompts.append({"prompt_token_ids": ids})
            params.append(SamplingParams(n=1, max_tokens=min(job.max_tokens, room), temperature=judge.temperature,
                                         seed=seed + i))
            index.append(i)
        if prompts:
            # lora_request: a LoRA policy judges with its current adapter (self-rewarding).
            generated = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora_request)
            for i, output in zip(index, generated):
                outputs[i] = output.outputs[0].text
        return outputs


class JudgeWorker(JudgeMixin, EngineWorker):
    """A judge-only engine actor (``EngineSpec.judge``): the policy's weights (``dedicated``) or a
    fixed model (``external_vllm``)."""


def single_token_ids(tokenizer, text: str) -> list[int]:
    """Single-token spellings of ``text`` ('3', ' 3'); empty when it has none."""
    ids = {tuple(tokenizer.encode(s, add_special_tokens=False)) for s in (text, f" {text}")}
    return sorted(t[0] for t in ids if len(t) == 1)


def score_token_ids(tokenizer, score_min: int, score_max: int) -> dict[int, list[int]]:
    """Single-token spellings ('3', ' 3') of every score on the scale."""
    tokens = {}
    for value in range(score_min, score_max + 1):
        tokens[value] = single_token_ids(tokenizer, str(value))
        if not tokens[value]:
            raise ConfigError(f"judge.score_max = {score_max}: score {value} is not a single token for this "
                              "tokenizer; use judge.mode=generate or a smaller scale")
    if sum(len(ids) for ids in tokens.values()) > 20:
        raise ConfigError(f"judge.score_min..score_max = {score_min}..{score_max}: more than 20 score tokens, "
                          "beyond vLLM's default max_logprobs; use a smaller scale or judge.mode=generate")
    return tokens
