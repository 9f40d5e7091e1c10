"""Rollout: Ray actors that each own a vLLM engine and sample G candidates per prompt."""

from __future__ import annotations

import ray

from dynalign.batch import Candidate, Group
from dynalign.config import TrainConfig
from dynalign.engine import EngineSpec, EngineWorker, call_engines, engine_env, split_evenly
from dynalign.judge import JudgeMixin
from dynalign.weight_sync import SyncedEngines


class RolloutWorker(JudgeMixin, EngineWorker):  # JudgeMixin: judge.engine=shared judges here
    def generate_groups(self, prompts: list[tuple[str, str]], sampling: dict) -> list[Group]:
        """Apply the chat template and sample ``sampling['n']`` candidates per prompt in one batched call."""
        prompt_ids = [self.chat_token_ids([{"role": "user", "content": text}]) for _, text in prompts]
        outputs = self.generate_from_token_ids(prompt_ids, {**sampling, "logprobs": 0})
        groups = []
        for (prompt_id, text), ids, output in zip(prompts, prompt_ids, outputs):
            candidates = [
                Candidate(
                    token_ids=list(choice.token_ids),
                    text=choice.text,
                    logprobs=[step[token].logprob for step, token in zip(choice.logprobs, choice.token_ids)],
                    finish_reason=choice.finish_reason or "unknown",
                )
                for choice in output.outputs
            ]
            groups.append(Group(prompt_id=prompt_id, prompt=text, prompt_token_ids=ids, candidates=candidates,
                                generation_version=self.weight_version))
        return groups


class RolloutPool:
    """The rollout actors; prompts are spread over them in contiguous shares."""

    def __init__(self, config: TrainConfig, synced: SyncedEngines | None = None):
        """``synced``: where the engines join the weight sync's targets (a new SyncedEngines
        without one)."""
        from dynalign.placement import engine_placement

        rollout = config.rollout
        self.placement = engine_placement(config, "rollout")  # fit check + placement groups
        actor = ray.remote(RolloutWorker)
        self.config = config
        # max_restarts: Ray brings a dead engine back; call_engines restores its weights and retries.
        spec = EngineSpec.rollout(config)
        self.workers = [actor.options(**self.placement.options(i, engine_env(spec)), max_restarts=-1)
                        .remote(spec, f"rollout-{i}", rollout.seed + i) for i in range(rollout.num_workers)]
        self.infos = ray.get([w.info.remote() for w in self.workers])
        self.synced = synced if synced is not None else SyncedEngines()
        self.synced.add(self.workers, [info["name"] for info in self.infos])

    def sampling(self, iteration: int, round_index: int = 0) -> dict:
        rollout = self.config.rollout
        return {"n": rollout.group_size, "max_tokens": rollout.max_new_tokens, "temperature": rollout.temperature,
                "top_p": rollout.top_p,
                # Distinct, reproducible streams per (iteration, refill round, prompt position).
                "seed": rollout.seed * 10**9 + iteration * 10**6 + round_index * 10**4}

    def generate(self, prompts: list[tuple[str, str]], iteration: int, round_index: int = 0) -> list[Group]:
        if not prompts:
            return []
        shares = split_evenly(prompts, len(self.workers))
        sampling = self.sampling(iteration, round_index)
        jobs, offset = [], 0
        for worker, info, share in zip(self.workers, self.infos, shares):
            if share:
                jobs.append((worker, info["name"], "generate_groups", (share, {**sampling, "seed": sampling["seed"] + offset})))
            offset += len(share)
        return [group for share in call_engines(jobs, self.synced.restore) for group in share]

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.placement.remove()

