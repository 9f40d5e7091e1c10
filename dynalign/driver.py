"""The driver: runs Dynamic Alignment iterations on a Ray cluster.

    1. prompts   -> fresh prompts about the value
    2. rollout   -> the policy samples G candidates per prompt (vLLM actors)
    3. judge     -> the policy, as judge, scores every candidate (judge actors)
    4. learn     -> GRPO on group-relative advantages (DeepSpeed ranks under Ray Train)
    5. sync      -> the new weights reach every rollout and judge engine

With ``rollout.max_staleness >= 1`` steps 1-3 of the next iteration run on the engines during
step 4 (dynalign/overlap.py; docs/architecture.md, "Off-policy overlap").
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dynalign import checkpoint, grpo
from dynalign.batch import Group, Sample
from dynalign.config import ConfigError, TrainConfig, to_yaml, writable_dir
from dynalign.data import PromptStream, load_prompts
from dynalign.files import append_jsonl, atomic_write_text, read_jsonl, write_jsonl
from dynalign.judge import Judge, judge_metrics, log_score_histogram, make_judge
from dynalign.learner import LearnerGroup, LearnerRestarted
from dynalign.metrics import MetricsLogger, Timings, read_metrics
from dynalign.model_fetch import check_model_dir
from dynalign.overlap import AHEAD_FILE, RolloutsAhead, ScoredRollouts
from dynalign.placement import init_ray, link_ray_logs
from dynalign.prompt_gen import FreshFirst, PromptSource
from dynalign.report import write_report_safely
from dynalign.rollout import RolloutPool
from dynalign.value import check_value_spec
from dynalign.weight_sync import SyncedEngines, WeightSync

log = logging.getLogger(__name__)


@dataclass
class System:
    """Every role of a run, started and stopped together."""

    rollout: RolloutPool
    judge: Judge
    learner: LearnerGroup
    weight_sync: WeightSync
    engines: SyncedEngines  # the engines the weight sync keeps current (rollout + a dedicated judge's)

    @classmethod
    def start(cls, config: TrainConfig, run_dir: Path) -> System:
        from dynalign import placement

        if config.cluster.check_resources:  # one line naming the role that cannot fit, not a hang
            placement.check_fits(config)
        # The learner ranks start (imports, process group, DeepSpeed) while the engines load: most
        # of either start-up is waiting. Not when engines and learner share accelerators
        # (sleep_while_learning): vLLM sizes its KV cache from the memory free at its start.
        learner = LearnerGroup(config, storage_path=config.cluster.storage_path or run_dir / "ray_train",
                               wait=config.rollout.sleep_while_learning)
        engines = SyncedEngines(sleep_while_learning=config.rollout.sleep_while_learning)
        rollout = judge = None
        try:
            rollout = RolloutPool(config, engines)
            judge = make_judge(config, rollout, engines)  # judge.engine=shared judges on the rollout engines
            if not learner.infos:
                learner.wait_ready()
        except BaseException:
            learner.kill()  # not a graceful stop: its ranks may still be starting
            for role in (judge, rollout):
                if role is not None:
                    role.shutdown()
            raise
        # From here on an engine Ray restarts gets the weights of the last sync (engines.restore).
        return cls(rollout, judge, learner, WeightSync(config, engines), engines)

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        """One learner update; with ``rollout.sleep_while_learning`` the engines sleep through it."""
        with self.engines.asleep():
            return self.learner.train_step(samples)

    def placement(self) -> dict:
        """Where each role's processes run (Ray node id, pid), as ``run_dir/placement.json`` keeps it."""
        # A rule or endpoint judge has no engine; a shared one lists the rollout engines.
        own_judges = [info for info in getattr(self.judge, "infos", []) if info not in self.rollout.infos]
        return {"rollout": self.rollout.infos, "judge": own_judges, "learner": self.learner.infos}

    def shutdown(self) -> None:
        self.learner.shutdown()
        self.rollout.shutdown()
        self.judge.shutdown()


def train(config: TrainConfig, resume: str | None = None, overwrite: bool = False) -> dict:
    # Every input is checked before run_dir is touched: a bad option never costs an earlier run.
    check_model_dir(config.model.path, "model.path")
    config = absolute_paths(config)
    check_value_spec(config)
    prompts = load_prompts(config)
    fresh_prompt_state = prompts.state()
    run_dir = Path(config.run_dir)
    resume_from = checkpoint.resolve(run_dir, resume) if resume else None
    prepare_run_dir(run_dir, fresh=resume_from is None, overwrite=overwrite)
    atomic_write_text(run_dir / "config.yaml", to_yaml(config))
    init_ray(config)
    if not config.logging.verbose and (logs := link_ray_logs(run_dir)):
        log.info("library output (Ray, vLLM, DeepSpeed) goes to %s (--verbose shows it here)", logs)
    started = time.perf_counter()
    judges = config.judge.actor_count
    judge_where = (f"{judges} engine(s) of its own" if judges else
                   "the rollout engines" if config.judge.kind == "policy" else f"kind {config.judge.kind}")
    log.info("starting %d rollout engine(s) and %d learner rank(s); the judge runs on %s",
             config.rollout.num_workers, config.learner.num_ranks, judge_where)
    system = System.start(config, run_dir)
    log.info("started in %.0f s", time.perf_counter() - started)
    atomic_write_text(run_dir / "placement.json", json.dumps(system.placement(), indent=2))
    stop = GracefulStop()
    history: dict[int, dict] = {}
    source = PromptSource(config, prompts)
    logger = rollouts = None
    try:
        source = PromptSource.start(config, prompts, system.rollout, run_dir)  # the prompts file, or generation
        rollouts = RolloutsAhead(functools.partial(generate_and_judge, system, source, config),
                                 config.rollout.max_staleness)
        iteration = restore(system, source, rollouts, resume_from, run_dir, history) if resume_from else 0
        logger = MetricsLogger(run_dir, config)  # metrics.jsonl and logging.backends' trackers
        progress = tqdm(total=config.iterations, initial=iteration, desc="iterations", disable=not config.logging.progress)
        while iteration < config.iterations:
            try:
                groups, metrics = run_iteration(system, rollouts, config, iteration)  # steps 1-5
                history[iteration] = metrics
                logger.log(iteration, metrics)
                log_score_histogram(logger.writer, groups, iteration)
                log_iteration_data(run_dir, iteration, groups, config.logging.log_samples)
                if stop.requested or due(config.checkpoint.every, iteration, config.iterations):
                    save_checkpoint(system, run_dir, iteration, prompts, config, rollouts)
            except LearnerRestarted as restart:  # a rank died; Ray Train restarted the learner group
                rollouts.discard()  # groups produced ahead for an iteration that is replayed
                iteration = replay_from_learner_checkpoint(system, source, rollouts, run_dir, history,
                                                           fresh_prompt_state, restart)
                progress.n = iteration
                continue
            iteration += 1
            progress.update(1)
            if stop.requested:
                log.info("stopped by signal after iteration %d; checkpoint written", iteration - 1)
                break
        progress.close()
        if iteration >= config.iterations and config.checkpoint.save_final_policy:
            system.learner.save_policy(run_dir / "policy")  # with LoRA: the adapter merged in
            if config.learner.lora.enabled:
                system.learner.save_adapter(run_dir / "adapter")  # and the adapter alone, in PEFT format
    finally:
        if logger is not None:
            logger.close()
        if rollouts is not None:
            rollouts.close()
        stop.restore()
        source.close()
        system.shutdown()
    summary = summarize([history[i] for i in sorted(history)], run_dir)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    print_summary(summary)
    if config.logging.report:
        write_report_safely(run_dir)  # RUN_DIR/report/index.html; a plotting failure only warns
    return summary


def run_iteration(system: System, rollouts: RolloutsAhead, config: TrainConfig, iteration: int) -> tuple[list[Group], dict]:
    """One Dynamic Alignment iteration; returns the groups trained on and the iteration's metrics."""
    timings = Timings()
    with timings("rollouts"):  # 1-3 now, or only what is left of them when produced ahead (max_staleness >= 1)
        scored = rollouts.get(iteration)                                                              # 1-3
    with timings("learn"):
        samples, advantage_stats = to_samples(scored.groups, config)
        if iteration + 1 < config.iterations:
            rollouts.start(iteration + 1)  # max_staleness >= 1: the engines produce the next groups meanwhile
        learn_stats = system.train_step(samples)                                                      # 4
    with timings("ahead_wait"):
        rollouts.finish()  # the engines finish the next iteration's groups before their weights change
    with timings("sync"):
        sync_stats = system.weight_sync.sync(system.learner, version=iteration + 1)                   # 5
    return scored.groups, {**scored.stats, **prefixed("adv", advantage_stats), **prefixed("learner", learn_stats),
                           **sync_stats, **timings.summary()}


def generate_and_judge(system: System, source: PromptSource, config: TrainConfig, iteration: int,
                       prompts: list[tuple[str, str]] | None = None) -> ScoredRollouts:
    """Steps 1-3 of ``iteration``: its prompts (or ``prompts``, dropped groups' to generate again),
    the candidates the engines sample and the judge's rewards, with their metrics."""
    timings = Timings()
    with timings("prompts"):
        stream, prompt_stats = source.for_iteration(iteration) if prompts is None else (FreshFirst(prompts, source.fallback), {})
    groups, data_stats = sample_scored_groups(system, stream, config, iteration, timings)
    return ScoredRollouts(iteration, groups, {**prefixed("prompts", prompt_stats), **data_stats, **timings.phases()})


def save_checkpoint(system: System, run_dir: Path, iteration: int, prompts: PromptStream, config: TrainConfig,
                    rollouts: RolloutsAhead) -> None:
    """Write the checkpoint of a completed iteration, then register it with Ray Train, so that a
    learner group it restarts starts from there."""
    # Every other random choice is seeded from (seed, iteration); the judge's call counter seeds its
    # sampling (judge.mode=generate), so it is part of the exact-resume state. So are the groups
    # produced ahead (max_staleness >= 1): the prompts and judge calls they took are counted in it.
    state = {"prompts": prompts.state(), "judge_calls": system.judge.calls}
    path = checkpoint.save(run_dir, iteration, system.learner, state, config.checkpoint.keep_last,
                           adapter=config.learner.lora.enabled,
                           records={AHEAD_FILE: ahead} if (ahead := rollouts.state()) else {})
    system.learner.report_checkpoint(path, iteration)


def restore(system: System, source: PromptSource, rollouts: RolloutsAhead, checkpoint_dir: Path, run_dir: Path,
            history: dict) -> int:
    """Continue from a checkpoint (``--resume``): learner state, engine weights, prompt order,
    groups produced ahead, logs and the metrics so far. Returns the first iteration still to run."""
    state = checkpoint.load_state(checkpoint_dir)
    system.learner.load_checkpoint(checkpoint_dir / "learner")
    system.learner.report_checkpoint(checkpoint_dir, state["iteration"])
    return rewind(system, source, rollouts, state, checkpoint_dir, run_dir, history)


def replay_from_learner_checkpoint(system: System, source: PromptSource, rollouts: RolloutsAhead, run_dir: Path,
                                   history: dict, fresh_prompt_state: dict, restart: Exception) -> int:
    """Ray Train restarted the learner group from the checkpoint last registered with it (or from
    the initial weights if none was). Put the driver's side back to the same point, so the lost
    iterations are replayed exactly; returns the first iteration to run again."""
    while True:
        try:
            restored = system.learner.acknowledge_restart()
            state = (checkpoint.load_state(Path(restored["path"])) if restored
                     else {"iteration": -1, "prompts": fresh_prompt_state, "judge_calls": 0})
            next_iteration = rewind(system, source, rollouts, state, Path(restored["path"]) if restored else None,
                                    run_dir, history)
            break
        except LearnerRestarted as again:  # it died again while coming back; Ray Train bounds the retries
            restart = again
    log.warning("%s; it restarted from %s; replaying from iteration %d", restart,
                restored["path"] if restored else "the initial weights (no checkpoint yet)", next_iteration)
    return next_iteration


def rewind(system: System, source: PromptSource, rollouts: RolloutsAhead, state: dict, checkpoint_dir: Path | None,
           run_dir: Path, history: dict) -> int:
    """Engines, prompts (stream position, generated pool), groups produced ahead, logs and
    ``history`` back to the end of ``state["iteration"]`` (``checkpoint_dir``'s; None: before the
    first), where the learner is. Returns the first iteration to run."""
    system.weight_sync.sync(system.learner, version=state["iteration"] + 1)
    ahead = read_jsonl(checkpoint_dir / AHEAD_FILE, missing_ok=True) if checkpoint_dir else []
    rollouts.restore(ahead)
    # Groups produced ahead used the next iteration's generated prompts: the pool keeps them.
    source.rewind(state["iteration"] + (1 if ahead else 0), state["prompts"])
    system.judge.calls = state.get("judge_calls", 0)
    for name in ("metrics.jsonl", "prompt_ids.jsonl", "samples.jsonl"):
        truncate_jsonl(run_dir / name, last_iteration=state["iteration"])
    # The metrics log, now cut at the checkpoint, is the run's history (the summary covers it all).
    history.clear()
    if (run_dir / "metrics.jsonl").is_file():
        history.update((record["iteration"], record) for record in read_metrics(run_dir))
    return state["iteration"] + 1


def due(every: int, iteration: int, iterations: int) -> bool:
    """Checkpoint every ``every`` iterations and after the last one."""
    return iteration == iterations - 1 or (every > 0 and (iteration + 1) % every == 0)


class GracefulStop:
    """SIGINT/SIGTERM ask the loop to finish the current iteration, checkpoint and shut down; a
    second signal abandons the iteration at once (actors are still shut down)."""

    def __init__(self):
        self.requested = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: abandoning the iteration")
        self.requested = True
        log.info("%s received; finishing the iteration, then checkpointing", signal.Signals(signum).name)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def sample_scored_groups(system: System, prompts: PromptStream, config: TrainConfig, iteration: int,
                         timings: Timings) -> tuple[list[Group], dict[str, float]]:
    """Generate and judge groups; with ``drop_tied_groups``, replace groups whose rewards all tie
    (no learning signal) by fresh prompts for up to ``max_refill_rounds`` extra rounds."""
    wanted = config.data.prompts_per_iteration
    informative, tied, judged = [], [], []
    rounds = 1 + (config.learner.max_refill_rounds if config.learner.drop_tied_groups else 0)
    for round_index in range(rounds):
        with timings("generate"):
            groups = system.rollout.generate(prompts.take(wanted - len(informative)), iteration, round_index)
        with timings("judge"):
            system.judge.score(groups)
        judged += groups
        for group in groups:
            no_signal = bool(grpo.zero_variance_groups(torch.tensor([group.rewards], dtype=torch.float64))[0])
            (tied if no_signal and config.learner.drop_tied_groups else informative).append(group)
        if len(informative) >= wanted:
            break
    seen = len(informative) + len(tied)
    if not informative:
        log.warning("iteration %d: all %d groups have zero reward variance after %d round(s); no learning signal, "
                    "the update is a no-op (check the judge or rewards)", iteration, seen, round_index + 1)
    # Keep the batch shape fixed: top up with tied groups (their advantages are zero).
    chosen = informative + tied[: wanted - len(informative)]
    all_rewards = [r for g in chosen for r in g.rewards]
    rewards = [r for r in all_rewards if not math.isnan(r)]
    judge_stats = judge_metrics(judged, config.judge)  # every group judged this iteration, refills included
    judge_stats["invalid_share"] = 1 - len(rewards) / max(len(all_rewards), 1)
    lengths = [len(c.token_ids) for g in chosen for c in g.candidates]
    return chosen, {
        "reward_mean": sum(rewards) / max(len(rewards), 1),
        "reward_max": max(rewards, default=float("nan")),
        "reward_min": min(rewards, default=float("nan")),
        "tied_group_share": len(tied) / max(seen, 1),
        "generation_rounds": float(round_index + 1),
        "completion_length_mean": sum(lengths) / max(len(lengths), 1),
        "truncated_share": sum(c.finish_reason == "length" for g in chosen for c in g.candidates) / max(len(lengths), 1),
        "prompts_skipped_too_long": float(prompts.skipped_too_long),
        **prefixed("judge", judge_stats),
    }


def to_samples(groups: list[Group], config: TrainConfig) -> tuple[list[Sample], dict[str, float]]:
    """Group-relative advantages, one training sample per candidate."""
    group_rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float64)
    advantages, _valid, stats = grpo.group_advantages(group_rewards, std_norm=config.learner.adv_std_norm)
    samples = [
        Sample(prompt_token_ids=g.prompt_token_ids, completion_token_ids=c.token_ids,
               engine_logprobs=c.logprobs, advantage=float(advantages[i, j]))
        for i, g in enumerate(groups) for j, c in enumerate(g.candidates)
    ]
    return samples, stats


def prefixed(prefix: str, stats: dict) -> dict:
    return {f"{prefix}.{k}": float(v) for k, v in stats.items()}


def log_iteration_data(run_dir: Path, iteration: int, groups: list[Group], count: int) -> None:
    """Which prompts the iteration trained on, and a few of its candidates with their rewards."""
    append_jsonl(run_dir / "prompt_ids.jsonl", {"iteration": iteration, "prompt_ids": [g.prompt_id for g in groups]})
    append_jsonl(run_dir / "samples.jsonl", *({"iteration": iteration, "prompt_id": group.prompt_id,
                                               "prompt": group.prompt, "answer": candidate.text, "reward": reward,
                                               "generation_version": group.generation_version,
                                               "judge_version": group.judge_version}
                                              for group in groups[:count]
                                              for candidate, reward in zip(group.candidates[:2], group.rewards[:2])))


def truncate_jsonl(path: Path, last_iteration: int) -> None:
    """Drop records of iterations after ``last_iteration`` (written after the checkpoint) and a
    line cut short by a crash."""
    if path.is_file():
        write_jsonl(path, [r for r in read_jsonl(path) if r["iteration"] <= last_iteration])


RUN_LOGS = ("metrics.jsonl", "prompt_ids.jsonl", "samples.jsonl", "summary.json")


def prepare_run_dir(run_dir: Path, fresh: bool, overwrite: bool) -> None:
    """Create ``run_dir``; a fresh run refuses a directory that holds a run unless ``overwrite``
    (then the earlier run's logs and checkpoints go, so nothing of it mixes with the new one)."""
    writable_dir("run_dir", run_dir)
    if not fresh:
        return
    earlier = [name for name in (*RUN_LOGS, "checkpoints", "policy", "adapter") if (run_dir / name).exists()]
    if earlier and not overwrite:
        raise ConfigError(f"run_dir = '{run_dir}' holds a run ({', '.join(earlier)}); continue it with --resume, "
                          "replace it with --overwrite, or choose another run_dir")
    for name in earlier:
        target = run_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    for tracker_dir in ("tensorboard", "wandb", "mlruns"):  # logging.backends' local files
        shutil.rmtree(run_dir / tracker_dir, ignore_errors=True)


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """Actors do not run in the driver's working directory: pin local paths down first."""
    config = copy.deepcopy(config)
    config.run_dir = str(Path(config.run_dir).resolve())
    config.data.prompts_path = str(Path(config.data.prompts_path).resolve())
    config.judge.value_spec = str(Path(config.judge.value_spec).resolve())
    if Path(config.model.path).exists():
        config.model.path = str(Path(config.model.path).resolve())
    return config


def summarize(history: list[dict], run_dir: Path) -> dict:
    rewards = [m["reward_mean"] for m in history]
    return {
        "iterations": len(history),
        "reward_mean_first": rewards[0] if rewards else None,
        "reward_mean_last": rewards[-1] if rewards else None,
        "reward_mean_per_iteration": rewards,
        "seconds_per_iteration": [m["time.total"] for m in history],
        "time_split_last": {k: v for k, v in (history[-1] if history else {}).items() if k.startswith("time.")},
        "run_dir": str(run_dir),
        "policy": str(run_dir / "policy"),
        "metrics": str(run_dir / "metrics.jsonl"),
    }


def print_summary(summary: dict) -> None:
    print("\n=== dynalign run summary ===")
    for i, (reward, seconds) in enumerate(zip(summary["reward_mean_per_iteration"], summary["seconds_per_iteration"])):
        print(f"iteration {i}: reward_mean {reward:.4f}  ({seconds:.1f} s)")
    print(f"metrics: {summary['metrics']}\npolicy:  {summary['policy']}\nrun dir: {summary['run_dir']}")
