"""The ``Judge`` interface the driver uses, the rule reward, and what every model judge shares
(value spec, decoded mode, seeds, from judgements to rewards and metrics)."""

from __future__ import annotations

import logging

from dynalign.batch import Group
from dynalign.config import ConfigError, TrainConfig
from dynalign.judge.jobs import judge_mode
from dynalign.judge.rewards import judge_metrics, shape_rewards, summarize_judgements
from dynalign.value import ValueSpec

log = logging.getLogger(__name__)


class Judge:
    """Scores groups with the configured judge: ``score`` fills ``group.rewards`` (NaN = invalid)
    and ``group.judge_info`` and returns the judge metrics of those groups.

    ``calls`` seeds the judge's sampling and is part of the exact-resume state. (A dedicated
    policy judge adds its engines to the weight sync's targets, ``weight_sync.SyncedEngines``.)"""

    def __init__(self, config: TrainConfig):
        self.config, self.judge = config, config.judge
        self.calls = 0

    def score(self, groups: list[Group]) -> dict[str, float]:
        raise NotImplementedError

    def shutdown(self) -> None:
        pass


class RuleJudge(Judge):
    """Rule-based rewards on token ids, for tests: they make learning measurable without a judge model."""

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        self.max_new_tokens = config.rollout.max_new_tokens
        if self.judge.rule == "target_token_share":
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(config.model.path)
            self.target_ids = set()
            for target in self.judge.rule_targets:
                ids = tokenizer.encode(str(target), add_special_tokens=False)
                if len(ids) != 1:
                    raise ConfigError(f"judge.rule_targets: {target!r} encodes to {len(ids)} tokens; "
                                      "choose strings that are one token each")
                self.target_ids.add(ids[0])

    def rewards(self, group: Group) -> list[float]:
        if self.judge.rule == "length":
            return [len(c.token_ids) / self.max_new_tokens for c in group.candidates]
        return [sum(t in self.target_ids for t in c.token_ids) / max(len(c.token_ids), 1) for c in group.candidates]

    def score(self, groups: list[Group]) -> dict[str, float]:
        if not groups:
            return {}
        for group in groups:
            group.rewards = self.rewards(group)
            group.judge_info = {"score": list(group.rewards)}
        return judge_metrics(groups, self.judge)


class ModelJudge(Judge):
    """A model scores against the value spec in ``judge.mode``; subclasses say where (``judge_items``)."""

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        self.spec = ValueSpec.load(self.judge.value_spec)
        self.spec.check(self.judge)
        self.mode = judge_mode(self.judge, self.spec)

    def judge_items(self, items: list[tuple[str, list[str]]], seed: int) -> list[dict]:
        """Per group (question, answers): {values: {(candidate, repeat, pillar): score}, **counters}."""
        raise NotImplementedError

    def score(self, groups: list[Group]) -> dict[str, float]:
        if not groups:
            return {}
        seed = (self.config.seed * 1_000_003 + 10_007 * self.calls) % 2**40
        self.calls += 1
        infos = self.judge_items([(g.prompt, [c.text for c in g.candidates]) for g in groups], seed)
        for group, info in zip(groups, infos):
            version = info.pop("weight_version", None)  # the judging engine's; only a policy judge's is the policy's
            group.judge_version = version if self.judge.kind == "policy" else None
            info.update(summarize_judgements(info, len(group.candidates), self.judge, self.spec))
            group.judge_info = info
            group.rewards = list(info["score"])
        shape_rewards(groups, self.judge, self.config.rollout.max_new_tokens)
        metrics = judge_metrics(groups, self.judge)
        self._warn(groups, metrics)
        return metrics

    def _warn(self, groups: list[Group], metrics: dict[str, float]) -> None:
        invalid = int(metrics.get("invalid", 0))
        if not invalid:
            return
        errors = [g.judge_info.get("error") for g in groups if g.judge_info.get("error")]
        unparsed = [g.judge_info.get("unparsed_example") for g in groups if g.judge_info.get("unparsed_example")]
        detail = f"last error: {errors[-1]}" if errors else f"e.g. unparsed output {unparsed[-1]!r}" if unparsed else ""
        log.warning("judge: %d of %d candidates invalid (NaN, left out of the advantages) after up to %d retries: "
                    "%d unparseable outputs, %d failed requests; %s", invalid, int(metrics["candidates"]),
                    self.judge.max_retries, int(metrics["parse_failures"]), int(metrics["errors"]), detail)
