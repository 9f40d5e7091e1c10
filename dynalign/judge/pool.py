"""Judges on vLLM engines (driver side), and ``make_judge``, the one place a judge is chosen:

- ``rule``: ``RuleJudge``, a rule on token ids (tests);
- ``openai``: ``OpenAIJudge`` on an OpenAI-compatible endpoint;
- ``policy`` with ``engine=shared``: ``SharedEngineJudge`` on the rollout engines;
- ``policy`` with ``engine=dedicated``, ``external_vllm``: ``OwnEngineJudge``, judge actors of its own.
"""

from __future__ import annotations

import ray

from dynalign.config import TrainConfig
from dynalign.engine import TIMED_OUT, EngineSpec, call_engines, engine_env, split_evenly
from dynalign.judge.base import Judge, ModelJudge, RuleJudge
from dynalign.judge.endpoint import OpenAIJudge
from dynalign.judge.engine import JudgeWorker
from dynalign.placement import engine_placement, role_requests


class EngineJudge(ModelJudge):
    """Judges on engine actors that inherit ``JudgeMixin``: each engine judges a contiguous share
    of the groups; an engine that dies is restarted, given the current weights and asked again
    (``call_engines``); a share still unjudged after ``judge.call_timeout_s`` is left invalid."""

    workers: list
    infos: list[dict]

    def engines(self) -> tuple[list, object]:
        """The engine actors now, and what restores the current weights into a restarted one."""
        raise NotImplementedError

    def judge_items(self, items, seed: int) -> list[dict]:
        workers, restore = self.engines()
        shares = [(index, worker, share)
                  for index, (worker, share) in enumerate(zip(workers, split_evenly(items, len(workers)))) if share]
        results = call_engines([(worker, f"judge engine {index}", "judge_groups",
                                 (share, self.mode, seed + index * 10**6)) for index, worker, share in shares],
                               restore, timeout_s=self.judge.call_timeout_s)
        infos = []
        for (_, _, share), result in zip(shares, results):
            infos += [self._timed_out(candidates) for _, candidates in share] if result is TIMED_OUT else result
        return infos

    def _timed_out(self, candidates: list[str]) -> dict:
        n = len(candidates) * self.mode.slots_per_candidate
        return {"values": {}, "judgements": n, "attempts": n, "parse_failures": 0, "errors": n, "retries": 0,
                "unparsed_example": "",
                "error": f"judge call timed out after judge.call_timeout_s = {self.judge.call_timeout_s:g} s"}


class SharedEngineJudge(EngineJudge):
    """``judge.engine=shared``: the rollout engines judge (they always hold the current policy)."""

    def __init__(self, config: TrainConfig, rollout):
        super().__init__(config)
        self.rollout = rollout  # its workers are read per call: a restarted engine is picked up

    @property
    def workers(self) -> list:
        return list(self.rollout.workers)

    @property
    def infos(self) -> list[dict]:
        return list(self.rollout.infos)

    def engines(self):
        return self.rollout.workers, self.rollout.synced.restore


class OwnEngineJudge(EngineJudge):
    """Judge-only engine actors (``JudgeWorker``): the policy's weights, synced with it
    (``engine=dedicated``), or a fixed model (``external_vllm``)."""

    def __init__(self, config: TrainConfig, synced=None):
        super().__init__(config)
        judge = config.judge
        self.placement = None
        spec = EngineSpec.judge(config)
        env = engine_env(spec)
        if any(r.role == "judge" for r in role_requests(config)):
            self.placement = engine_placement(config, "judge")  # fit check + placement groups
            options = [self.placement.options(i, env) for i in range(judge.num_workers)]
        else:  # a role the placement plan does not know: plain actors
            options = [{"num_cpus": judge.num_cpus_per_worker, "num_gpus": judge.num_gpus_per_worker,
                        "runtime_env": {"env_vars": env}}] * judge.num_workers
        actor = ray.remote(JudgeWorker)
        self.workers = [actor.options(**options[i], max_restarts=-1).remote(spec, f"judge-{i}", config.seed + 7919 * (i + 1))
                        for i in range(judge.num_workers)]
        self.infos = ray.get([w.info.remote() for w in self.workers])
        self.restore = None  # a fixed model (external_vllm) comes back as it was
        if judge.engines_synced and synced is not None:  # a SyncedEngines: the weight sync's targets
            synced.add(self.workers, [i["name"] for i in self.infos])
            self.restore = synced.restore

    def engines(self):
        return self.workers, self.restore

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        if self.placement is not None:
            self.placement.remove()


def make_judge(config: TrainConfig, rollout=None, synced=None) -> Judge:
    """The configured judge. ``rollout`` (a RolloutPool) is needed for ``judge.engine=shared``;
    a dedicated policy judge adds its engines to ``synced`` (a SyncedEngines)."""
    judge = config.judge
    if judge.kind == "rule":
        return RuleJudge(config)
    if judge.kind == "openai":
        return OpenAIJudge(config)
    if judge.uses_shared_engines:
        if rollout is None:
            raise ValueError("judge.engine=shared judges on the rollout engines: pass the RolloutPool")
        return SharedEngineJudge(config, rollout)
    return OwnEngineJudge(config, synced)
