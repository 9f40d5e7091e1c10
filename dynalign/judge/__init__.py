"""The judge: scores whole groups of candidates against the value (self-rewarding by default).

Kinds (``judge.kind``), each a ``Judge`` made by ``make_judge`` (pool.py):

- ``policy``: the policy judges its own candidates. ``judge.engine=shared`` runs the judgements on
  the rollout engines (no second copy of the weights; they always hold the current policy);
  ``dedicated`` starts judge engines of its own, which the weight sync updates too.
- ``external_vllm``: a fixed model (``judge.model_path``) in judge engines of its own, never synced.
- ``openai``: any OpenAI-compatible chat endpoint, called from the driver (concurrent requests).
- ``rule``: a rule-based reward on token ids, for tests.

Modes (``judge.mode``), decoded once into a ``JudgeMode`` (jobs.py); rubric and prompt templates
come from the value spec (dynalign/value.py, docs/judge.md):

- ``logprob``: expected score under the next-token distribution right after the score prefix
  (one forward pass per candidate; continuous; cannot fail to parse);
- ``generate``: a short justification, then ``Score: N``; ``judge.repeats`` samples averaged;
- ``group``: the judge sees all G candidates of a prompt at once and writes one
  ``Candidate K: Score: N`` line each; the order changes across repeats (seeded) against position bias.

The engine side is ``JudgeMixin`` (engine.py): any ``EngineWorker`` that inherits it can judge (the
rollout actors do, for ``engine=shared``). Unparseable or failed judgements are retried, then marked
invalid (NaN): GRPO leaves them out of the advantages, and they are counted in the metrics.

Modules: prompts (fencing, rendering; the pairwise prompt of `dynalign eval`), parse (reading
scores and verdicts), jobs (modes, requests, retries), engine (actor side, score tokens), base (the
Judge interface, rule judge), endpoint (OpenAI), pool (engine judges, make_judge), rewards (from
judgements to rewards, metrics).
"""

from dynalign.judge.base import Judge, ModelJudge, RuleJudge
from dynalign.judge.endpoint import OpenAIJudge
from dynalign.judge.engine import JudgeMixin, JudgeWorker, score_token_ids, single_token_ids
from dynalign.judge.jobs import (
    Job,
    JudgeMode,
    JudgeRequestError,
    group_orders,
    judge_mode,
    judge_text_groups,
    run_jobs,
)
from dynalign.judge.parse import (
    final_answer,
    message_text,
    parse_group_scores,
    parse_score,
    parse_verdict,
)
from dynalign.judge.pool import OwnEngineJudge, SharedEngineJudge, make_judge
from dynalign.judge.prompts import (
    fence,
    format_instructions,
    judge_messages,
    pairwise_messages,
    render,
    rubric_text,
    score_label,
)
from dynalign.judge.rewards import (
    aggregate_pillars,
    judge_metrics,
    log_score_histogram,
    repeat_agreement,
    shape_rewards,
    summarize_judgements,
)

__all__ = [
    "Job", "Judge", "JudgeMixin", "JudgeMode", "JudgeRequestError", "JudgeWorker", "ModelJudge", "OpenAIJudge",
    "OwnEngineJudge", "RuleJudge", "SharedEngineJudge", "aggregate_pillars", "fence", "final_answer",
    "format_instructions", "group_orders", "judge_messages", "judge_metrics", "judge_mode", "judge_text_groups",
    "log_score_histogram", "make_judge", "message_text", "pairwise_messages", "parse_group_scores", "parse_score",
    "parse_verdict", "render", "repeat_agreement", "rubric_text", "run_jobs", "score_label", "score_token_ids",
    "shape_rewards", "single_token_ids", "summarize_judgements",
]
