"""`dynalign eval`: is the trained policy more aligned than its baseline, and still capable?

Value alignment (this module):

1. **Held-out prompts.** Eval prompts (``eval.prompts_path``: prompt, pillar, id) are kept apart
   from every training prompt of the run by ROUGE-L: a prompt whose ROUGE-L F against any
   training prompt reaches ``eval.holdout_threshold`` is dropped and reported (``novelty.py``).
   Training prompts = the run's prompts file and its generated prompts (``RUN_DIR/prompts``),
   narrowed to the ids in ``prompt_ids.jsonl`` when the run logged them.
2. **Answers.** Policy and baseline answer every prompt (vLLM engines in Ray actors; greedy by
   default, so a second evaluation sees the same answers).
3. **Pairwise judgement, both orders.** The judge sees (question, answer 1, answer 2) and is asked
   which answer better embodies the value; every pair is judged twice, policy first and baseline
   first. Per order the judge gives ``p`` = its preference for answer 1:
   ``logprob`` mode: ``P('1') / (P('1') + P('2'))`` of its next token after ``Winner:`` (one
   forward pass, never fails to parse); ``generate`` mode: it writes ``Winner: 1|2|tie`` (1, 0,
   0.5). The policy's preference is the mean over the two orders, ``(p_AB + 1 - p_BA) / 2``: a
   judge that always prefers the first (or second) position lands at 0.5 exactly, so position
   bias cancels. Verdict: **win** if the preference is above ``0.5 + tie_band``, **loss** if below
   ``0.5 - tie_band``, else **tie**.
4. **Rubric scores.** The judge also scores each answer alone on the value's rubric (the training
   judge's prompt, ``dynalign.judge``; expected score in logprob mode, ``Score: N`` in generate mode).
5. **Intervals.** Win, tie and loss rates (and the mean rubric scores) with percentile bootstrap
   intervals over prompts (numpy, seeded), overall and per pillar (``eval_tables.py``). Resampling
   the same prompt indices for every quantity makes the result of swapping the two models the
   exact mirror image.

The pairwise prompt and its parser live with the judge's (``judge/prompts.py``, ``judge/parse.py``);
the engines are ``EngineWorker`` actors on ``EngineSpec.other`` with the rollout engines'
placement (``placement.py``).

Outputs in ``--out`` (default ``RUN_DIR/eval`` for a run's policy): ``value_alignment.json``,
``value_alignment.md`` and ``value_alignment_samples.jsonl`` (every answer and judgement).
General abilities (lm-evaluation-harness) live in ``harness.py``; ``dynalign eval --tasks`` runs
both. See docs/evaluation.md.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dynalign import files
from dynalign.config import ConfigError, EvalConfig, TrainConfig, api_key_from_env
from dynalign.engine import EngineSpec, EngineWorker, engine_env, expected_value, local_path
from dynalign.eval_tables import summarize, verdicts, write_outputs
from dynalign.judge.engine import score_token_ids, single_token_ids
from dynalign.judge.parse import parse_score, parse_verdict
from dynalign.judge.prompts import VERDICT_PREFIX, judge_messages, pairwise_messages, score_label
from dynalign.model_fetch import check_model_dir
from dynalign.value import ValueSpec

MODEL_FIX = "give a Hugging Face model directory (with config.json), e.g. RUN_DIR/policy"


# ---------------------------------------------------------------------------------------------
# Prompts: the eval set, the run's training prompts, the held-out filter
# ---------------------------------------------------------------------------------------------

@dataclass
class EvalPrompt:
    id: str
    prompt: str
    pillar: str | None = None


def read_rows(path: str | Path, what: str) -> list[dict]:
    """Rows of a JSONL or Parquet file (one-line ConfigError when missing or unreadable)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} = '{path}': no such file; give a JSONL or Parquet file of prompts")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix in (".jsonl", ".json"):
            rows = files.read_jsonl(path, cut_last_line_ok=False)
            if not all(isinstance(r, dict) for r in rows):
                raise ValueError("each line must be a JSON object")
            return rows
    except Exception as err:
        first = err.reason if isinstance(err, files.JsonlError) else \
            str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{what} = '{path}': could not be read ({first})") from None
    raise ConfigError(f"{what} = '{path}': unsupported file type '{suffix}'; use .jsonl or .parquet")


def load_eval_prompts(ev: EvalConfig, path: str | Path | None = None) -> list[EvalPrompt]:
    path = path or ev.prompts_path
    rows = read_rows(path, "eval.prompts_path")
    if rows and ev.prompt_key not in rows[0]:
        raise ConfigError(f"eval.prompt_key = '{ev.prompt_key}': no such column in {path}; "
                          f"columns are {', '.join(rows[0])}")
    prompts = [EvalPrompt(str(row.get(ev.id_key, index)), str(row[ev.prompt_key]),
                          str(row[ev.pillar_key]) if row.get(ev.pillar_key) not in (None, "") else None)
               for index, row in enumerate(rows) if str(row.get(ev.prompt_key) or "").strip()]
    if not prompts:
        raise ConfigError(f"eval.prompts_path = '{path}': the file holds no prompts")
    return prompts


def training_prompts(config: TrainConfig, run_dir: str | Path | None) -> tuple[list[str], list[str]]:
    """Every training prompt the run could have used, and where they came from.

    The run's prompts file (``data.prompts_path`` in ``RUN_DIR/config.yaml``, else the given
    config's) plus its generated prompts (``RUN_DIR/prompts/*.parquet``); when the run logged
    ``prompt_ids.jsonl`` only the prompts it actually trained on count (all of them if no id
    matches, e.g. ids renumbered)."""
    data = config.data
    run_dir = Path(run_dir) if run_dir else None
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        from omegaconf import OmegaConf

        run = OmegaConf.load(run_dir / "config.yaml")
        data = dataclasses.replace(data, **{k: v for k in ("prompts_path", "prompt_key", "id_key")
                                            if (v := OmegaConf.select(run, f"data.{k}")) is not None})
    sources, by_id = [], {}
    if Path(data.prompts_path).is_file():
        for index, row in enumerate(read_rows(data.prompts_path, "data.prompts_path")):
            if row.get(data.prompt_key):
                by_id.setdefault(str(row.get(data.id_key, index)), []).append(str(row[data.prompt_key]))
        sources.append(str(data.prompts_path))
    if run_dir is not None and (run_dir / "prompts").is_dir():
        for file in sorted((run_dir / "prompts").glob("*.parquet")):
            for row in read_rows(file, "generated prompts"):
                if row.get("prompt"):
                    by_id.setdefault(str(row.get("id")), []).append(str(row["prompt"]))
            sources.append(str(file))
    used = set()
    if run_dir is not None and (run_dir / "prompt_ids.jsonl").is_file():
        for record in files.read_jsonl(run_dir / "prompt_ids.jsonl"):
            used.update(str(i) for i in record.get("prompt_ids", []))
    texts = [t for key, group in by_id.items() if not used or key in used for t in group]
    if used and not texts:  # ids did not match: be conservative
        texts = [t for group in by_id.values() for t in group]
    return list(dict.fromkeys(texts)), sources


def hold_out(prompts: list[EvalPrompt], training: list[str], threshold: float
             ) -> tuple[list[EvalPrompt], list[dict]]:
    """Eval prompts whose ROUGE-L F against every training prompt is below ``threshold``, and the
    dropped ones with their nearest training prompt.

    One pass of the novelty filter with the training prompts as its pool; kept eval prompts join
    the pool, so a prompt whose best match is another eval prompt is re-scored against the
    training prompts alone (eval prompts may resemble each other)."""
    from dynalign.novelty import NoveltyFilter, rouge_l_f, rouge_tokens

    if not training:
        return list(prompts), []
    novelty = NoveltyFilter(threshold)
    novelty.add_existing(training)
    kept, dropped = [], []
    for prompt, decision in zip(prompts, novelty.filter([p.prompt for p in prompts])):
        best, nearest = decision.best_score, decision.nearest_index
        if not decision.kept and nearest is not None and nearest >= len(training):
            tokens = rouge_tokens(prompt.prompt)
            scores = [rouge_l_f(tokens, rouge_tokens(t)) for t in training]
            nearest = int(np.argmax(scores))
            best = scores[nearest]
        if best < threshold:
            kept.append(prompt)
        else:
            dropped.append({"id": prompt.id, "prompt": prompt.prompt, "pillar": prompt.pillar,
                            "rouge_l": round(float(best), 4), "nearest_training_prompt": training[nearest]})
    return kept, dropped


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------

class EvalWorker(EngineWorker):
    """A vLLM engine (Ray actor) that answers prompts and judges answers for `dynalign eval`."""

    def answer(self, prompts: list[str], sampling: dict) -> list[dict]:
        outputs = self.generate_fitting([self.chat_token_ids([{"role": "user", "content": p}]) for p in prompts],
                                        sampling)
        return [{"text": "", "tokens": 0, "finish_reason": "prompt_too_long"} if out is None else
                {"text": out.outputs[0].text, "tokens": len(out.outputs[0].token_ids),
                 "finish_reason": out.outputs[0].finish_reason or "unknown"} for out in outputs]

    def preferences(self, items: list[tuple[str, str, str]], spec_path: str, mode: str, sampling: dict
                    ) -> list[dict]:
        """Per (question, first, second): ``p`` = preference for the first answer, or None."""
        self._forget_earlier_requests()
        spec = ValueSpec.load(spec_path)
        conversations = [pairwise_messages(spec, q, a, b, mode, self.special_tokens) for q, a, b in items]
        if mode == "generate":
            return [{"p": parse_verdict(t), "text": t} for t in self._write(conversations, sampling)]
        first, second = single_token_ids(self.tokenizer, "1"), single_token_ids(self.tokenizer, "2")
        if not first or not second:
            raise ConfigError("eval.judge_mode = logprob: '1' or '2' is not a single token for the judge's "
                              "tokenizer; use eval.judge_mode=generate")
        # P('1') / (P('1') + P('2')): the expected value with '1' worth 1 and '2' worth 0.
        return [{"p": expected_value(mass), "text": None}
                for mass in self._mass_after(conversations, VERDICT_PREFIX, {1: first, 0: second})]

    def rubric_scores(self, items: list[tuple[str, str]], spec_path: str, judge_config, sampling: dict
                      ) -> list[float | None]:
        """The value rubric score of each (question, answer) alone."""
        self._forget_earlier_requests()
        spec = ValueSpec.load(spec_path)
        conversations = [judge_messages(spec, judge_config, q, a) for q, a in items]
        lo, hi = judge_config.score_min, judge_config.score_max
        if judge_config.mode == "generate":
            return [parse_score(t, lo, hi) if t is not None else None for t in self._write(conversations, sampling)]
        try:
            tokens = score_token_ids(self.tokenizer, lo, hi)
        except ConfigError:  # the scale's scores are not single tokens: no expected score
            return [None] * len(items)
        return [expected_value(mass) for mass in self._mass_after(conversations, score_label(), tokens)]

    def _forget_earlier_requests(self) -> None:
        """Empty the prefix cache. A prompt prefilled on top of cached blocks rounds differently
        from one prefilled whole, so a judgement would depend on what the engine saw before;
        from an empty cache the same batch gives the same numbers (swapping the models mirrors
        exactly), and the batch still shares its own prefixes."""
        self.llm.reset_prefix_cache()

    def _write(self, conversations: list[list[dict]], sampling: dict) -> list[str | None]:
        outputs = self.generate_fitting([self.chat_token_ids(c) for c in conversations], sampling)
        return [None if out is None else out.outputs[0].text for out in outputs]

    def _mass_after(self, conversations: list[list[dict]], prefix: str, tokens: dict[Any, list[int]]
                    ) -> list[dict | None]:
        """Probability mass of each token set right after ``prefix`` (``next_token_mass``)."""
        prefix_ids = self.tokenizer.encode(prefix, add_special_tokens=False)
        return self.next_token_mass([self.chat_token_ids(c) + prefix_ids for c in conversations], tokens)


class EvalEngines:
    """One engine per distinct model directory, started together and shared across evaluations
    (the judge of ``eval.judge=self`` is the policy's engine; a judge model that is also the
    baseline shares its engine). Each engine has the rollout engines' resources and vLLM
    settings, in a placement group of its own (``tensor_parallel_size`` bundles on one node)."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.engines: dict[str, Any] = {}
        self.placements: list[Any] = []

    def get(self, *paths: str) -> list[Any]:
        import ray

        from dynalign.placement import EnginePlacement, single_engine_request

        config, started = self.config, []
        for path in paths:
            key = local_path(path)
            if key in self.engines:
                continue
            name = f"eval-{len(self.engines)}"
            spec = EngineSpec.other(config, key, max(config.rollout.max_model_len, config.judge.max_model_len))
            placement = EnginePlacement(config, name, request=single_engine_request(config, name))
            self.placements.append(placement)
            actor = ray.remote(EvalWorker).options(**placement.options(0, engine_env(spec)))
            self.engines[key] = actor.remote(spec, name, config.eval.seed)
            started.append(self.engines[key])
        if started:
            ray.get([e.info.remote() for e in started])  # engines start in parallel; surface errors now
        return [self.engines[local_path(p)] for p in paths]

    def shutdown(self) -> None:
        import ray

        for engine in self.engines.values():
            ray.kill(engine)
        for placement in self.placements:
            placement.remove()
        self.engines, self.placements = {}, []

    def __enter__(self) -> EvalEngines:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


class EndpointJudge:
    """An OpenAI-compatible judge: always writes its verdict / score (generate mode)."""

    def __init__(self, ev: EvalConfig):
        from dynalign.generators import OpenAIGenerator

        api_key = api_key_from_env("eval.judge_api_key_env", ev.judge_api_key_env)
        self.client = OpenAIGenerator("eval-judge", ev.judge_base_url, ev.judge_api_model, api_key)
        self.ev = ev

    def preferences(self, items, spec_path: str, mode: str, sampling: dict) -> list[dict]:
        spec = ValueSpec.load(spec_path)
        conversations = [pairwise_messages(spec, q, a, b, "generate") for q, a, b in items]
        texts = self.client.generate(conversations, sampling["max_tokens"], sampling["temperature"], self.ev.seed)
        return [{"p": parse_verdict(t), "text": t} for t in texts]

    def rubric_scores(self, items, spec_path: str, judge_config, sampling: dict) -> list[float | None]:
        spec = ValueSpec.load(spec_path)
        conversations = [judge_messages(spec, judge_config, q, a) for q, a in items]
        texts = self.client.generate(conversations, sampling["max_tokens"], sampling["temperature"], self.ev.seed)
        return [parse_score(t, judge_config.score_min, judge_config.score_max) if t else None for t in texts]


class _Remote:
    """Call an engine actor's method as if local (so engines and the endpoint judge look alike)."""

    def __init__(self, actor):
        self.actor = actor

    def __getattr__(self, name):
        import ray

        method = getattr(self.actor, name)
        return lambda *args: ray.get(method.remote(*args))


def in_canonical_order(call, items: list[tuple], *args) -> list:
    """``call(items, *args)`` with the items sorted by content, results back in the given order.

    Swapping policy and baseline then sends the judge the very same batch (the same requests in
    the same order), so its numbers match bit for bit and the swapped result is the exact mirror."""
    order = sorted(range(len(items)), key=lambda i: items[i])
    results = call([items[i] for i in order], *args)
    out: list = [None] * len(items)
    for position, index in enumerate(order):
        out[index] = results[position]
    return out


# ---------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------

def run_dir_of(policy: str) -> Path | None:
    """The run a policy came from: RUN_DIR for RUN_DIR/policy (it holds config.yaml)."""
    parent = Path(policy).parent
    return parent if (parent / "config.yaml").is_file() or (parent / "metrics.jsonl").is_file() else None


def default_out_dir(policy: str) -> Path:
    run = run_dir_of(policy)
    return run / "eval" if run is not None else Path("outputs") / "eval"


def check_eval_config(config: TrainConfig) -> None:
    ev = config.eval
    if ev.judge == "model" and not ev.judge_model_path:
        raise ConfigError("eval.judge = model needs eval.judge_model_path (a model directory)")
    if ev.judge == "openai":
        for key in ("judge_base_url", "judge_api_model"):
            if not getattr(ev, key):
                raise ConfigError(f"eval.{key} = None: eval.judge=openai needs eval.judge_base_url and eval.judge_api_model")
        if ev.judge_mode == "logprob":
            raise ConfigError("eval.judge_mode = logprob: an OpenAI-compatible judge writes its verdict; "
                              "set eval.judge_mode=generate")


def evaluate_value(config: TrainConfig, policy: str, baseline: str, out_dir: str | Path | None = None,
                   prompts_path: str | None = None, run_dir: str | Path | None = None,
                   engines: EvalEngines | None = None) -> dict:
    """Policy vs baseline on held-out value prompts; writes JSON, markdown and the samples."""
    ev = config.eval
    check_eval_config(config)
    policy, baseline = check_model_dir(policy, "--policy", MODEL_FIX), check_model_dir(baseline, "--baseline", MODEL_FIX)
    judge_path = {"self": policy, "model": ev.judge_model_path}.get(ev.judge)
    if judge_path is not None:
        judge_path = check_model_dir(judge_path, "eval.judge_model_path", MODEL_FIX)
    spec_path = str(Path(config.judge.value_spec).resolve())
    spec = ValueSpec.load(spec_path)
    # The rubric prompt: the training judge's, in our mode, one score per answer.
    judge_config = dataclasses.replace(config.judge, mode="generate" if ev.judge == "openai" else ev.judge_mode,
                                       per_pillar=False)
    if ev.rubric:
        judge_messages(spec, judge_config, "question", "answer")  # a bad rubric fails here, in one line
    out = Path(out_dir) if out_dir is not None else default_out_dir(policy)
    run_dir = Path(run_dir) if run_dir is not None else run_dir_of(policy)
    started = time.perf_counter()

    all_prompts = load_eval_prompts(ev, prompts_path)
    training, sources = training_prompts(config, run_dir)
    prompts, dropped = hold_out(all_prompts, training, ev.holdout_threshold)
    if ev.max_prompts:
        prompts = prompts[: ev.max_prompts]
    if not prompts:
        raise ConfigError(f"eval.prompts_path = '{prompts_path or ev.prompts_path}': no prompt is held out "
                          f"(all {len(all_prompts)} reach ROUGE-L {ev.holdout_threshold} against a training prompt)")
    timings: dict[str, float] = {}

    own = engines is None
    engines = engines or EvalEngines(config)
    try:
        import ray

        mark = time.perf_counter()
        policy_engine, baseline_engine = engines.get(policy, baseline)
        judge = _Remote(engines.get(judge_path)[0]) if judge_path else EndpointJudge(ev)
        timings["engines"] = time.perf_counter() - mark

        mark = time.perf_counter()
        sampling = {"n": 1, "max_tokens": ev.max_new_tokens, "temperature": ev.temperature, "seed": ev.seed}
        texts = [p.prompt for p in prompts]
        answers_policy, answers_baseline = ray.get([policy_engine.answer.remote(texts, sampling),
                                                    baseline_engine.answer.remote(texts, sampling)])
        timings["answers"] = time.perf_counter() - mark

        mark = time.perf_counter()
        judge_sampling = {"n": 1, "max_tokens": ev.judge_max_new_tokens, "temperature": 0.0, "seed": ev.seed}
        items = [(p.prompt, a["text"], b["text"]) for p, a, b in zip(prompts, answers_policy, answers_baseline)]
        items += [(p.prompt, b["text"], a["text"]) for p, a, b in zip(prompts, answers_policy, answers_baseline)]
        judged = in_canonical_order(judge.preferences, items, spec_path, ev.judge_mode, judge_sampling)
        timings["pairwise"] = time.perf_counter() - mark

        rubric = [None] * (2 * len(prompts))
        if ev.rubric:
            mark = time.perf_counter()
            rubric = in_canonical_order(judge.rubric_scores,
                                        [(p.prompt, a["text"]) for p, a in zip(prompts, answers_policy)]
                                        + [(p.prompt, b["text"]) for p, b in zip(prompts, answers_baseline)],
                                        spec_path, judge_config, judge_sampling)
            timings["rubric"] = time.perf_counter() - mark
    finally:
        if own:
            engines.shutdown()

    n = len(prompts)
    rows = []
    for i, prompt in enumerate(prompts):
        first, second = judged[i]["p"], judged[n + i]["p"]  # policy first; baseline first
        shares = [v for v in (first, None if second is None else 1.0 - second) if v is not None]
        preference = sum(shares) / len(shares) if shares else None
        rows.append({"id": prompt.id, "pillar": prompt.pillar, "prompt": prompt.prompt,
                     "answer_policy": answers_policy[i]["text"], "answer_baseline": answers_baseline[i]["text"],
                     "tokens_policy": answers_policy[i]["tokens"], "tokens_baseline": answers_baseline[i]["tokens"],
                     "p_first_policy_first": first, "p_first_baseline_first": second,
                     "judge_text_policy_first": judged[i]["text"], "judge_text_baseline_first": judged[n + i]["text"],
                     "preference_policy": preference,
                     "rubric_policy": rubric[i], "rubric_baseline": rubric[n + i]})
    for row, verdict in zip(rows, verdicts([r["preference_policy"] for r in rows], ev.tie_band)):
        row["verdict"] = verdict
    firsts = [v for r in rows for v in (r["p_first_policy_first"], r["p_first_baseline_first"]) if v is not None]
    both = [r for r in rows if r["p_first_policy_first"] is not None and r["p_first_baseline_first"] is not None]
    result = {
        "value": spec.name,
        "policy": policy, "baseline": baseline,
        "judge": {"kind": ev.judge, "model": judge_path or ev.judge_api_model, "mode": ev.judge_mode
                  if ev.judge != "openai" else "generate"},
        "prompts": {"path": str(prompts_path or ev.prompts_path), "total": len(all_prompts),
                    "held_out": len(all_prompts) - len(dropped), "evaluated": n, "dropped_not_held_out": len(dropped),
                    "holdout_threshold": ev.holdout_threshold, "training_prompts": len(training),
                    "training_sources": sources, "dropped": dropped},
        "settings": {"tie_band": ev.tie_band, "bootstrap_samples": ev.bootstrap_samples, "confidence": ev.confidence,
                     "seed": ev.seed, "temperature": ev.temperature, "max_new_tokens": ev.max_new_tokens,
                     "score_min": config.judge.score_min, "score_max": config.judge.score_max},
        **summarize(rows, ev),
        "position": {
            # Mean preference for whichever answer is shown first: 0.5 = no position bias.
            "first_preference_mean": float(np.mean(firsts)) if firsts else None,
            # Share of pairs whose two orders agree on the winner (both above / both below 0.5 for the policy).
            "order_agreement": float(np.mean([(r["p_first_policy_first"] - 0.5) * (0.5 - r["p_first_baseline_first"]) > 0
                                              for r in both])) if both else None,
        },
        "answer_tokens_mean": {"policy": float(np.mean([r["tokens_policy"] for r in rows])),
                               "baseline": float(np.mean([r["tokens_baseline"] for r in rows]))},
        "seconds": {**{k: round(v, 3) for k, v in timings.items()}, "total": round(time.perf_counter() - started, 3)},
    }
    write_outputs(out, result, rows)
    result["out_dir"] = str(out)
    return result
