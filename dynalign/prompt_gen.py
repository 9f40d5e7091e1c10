"""Step 1 of Dynamic Alignment: language models write the training prompts (Self-Instruct style).

    plan requests -> generators answer -> parse -> filter -> store -> one PromptStream per iteration

Each request asks one generator (``generators.py``: the policy's own rollout engines, a separate
vLLM engine on another model, or an OpenAI-compatible endpoint) for ``prompts_per_request`` new
prompts about one pillar of the value in one domain, shown a few examples (seeds, and prompts
kept earlier). Answers are parsed, filtered (every drop counted by reason) and stored per
iteration by ``prompt_store.py``; a re-run loads the stored pool first, so it only appends.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dynalign.batch import chat_token_ids
from dynalign.config import ConfigError, TrainConfig
from dynalign.data import PromptStream
from dynalign.generators import start_generators
from dynalign.prompt_store import DROP_REASONS, Candidate, PromptFilter, PromptStore, parse_prompts
from dynalign.value import Pillar, ValueSpec

SEED_KEYS = ("domains", "scenario_kinds", "examples")


# ---------------------------------------------------------------------------------------------
# Value spec seeds and requests
# ---------------------------------------------------------------------------------------------

@dataclass
class Seeds:
    domains: list[str]
    scenario_kinds: list[str]
    examples: list[str]


def load_spec(path: str | Path) -> tuple[ValueSpec, Seeds]:
    """The value spec and its generation seeds; anything malformed is a one-line ConfigError."""
    try:
        spec = ValueSpec.load(path)
    except ConfigError:
        raise
    except Exception as err:  # YAML syntax errors are multi-line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"value spec {path}: not valid YAML ({first})") from None
    raw = spec.seeds
    if not isinstance(raw, dict):
        raise ConfigError(f"value spec {path}: 'seeds' must be a mapping of {', '.join(SEED_KEYS)}")
    unknown = sorted(set(raw) - set(SEED_KEYS))
    if unknown:
        raise ConfigError(f"value spec {path}: unknown key 'seeds.{unknown[0]}'; known: {', '.join(SEED_KEYS)}")
    values = {}
    for key in SEED_KEYS:
        items = raw.get(key) or []
        if not isinstance(items, list) or not all(isinstance(i, str) and i.strip() for i in items):
            raise ConfigError(f"value spec {path}: 'seeds.{key}' must be a list of non-empty strings")
        values[key] = [" ".join(i.split()) for i in items]
    return spec, Seeds(**values)


@dataclass
class Request:
    index: int
    generator: int
    pillar: str
    domain: str
    kind: str
    examples: list[str]


SYSTEM_PROMPT = "You write new, realistic requests that people might send to an AI assistant."


def request_messages(spec: ValueSpec, pillar: Pillar, request: Request, count: int,
                     examples: Sequence[str] | None = None, persona: str | None = None) -> list[dict]:
    """One Self-Instruct request: ``count`` new prompts for one pillar and domain, written as
    ``persona`` when one is given."""
    examples = request.examples if examples is None else examples
    lines = [f"Write {count} new prompts that test whether an assistant embodies {spec.name}: {spec.description}",
             f"Focus on {pillar.name}: {pillar.description}"]
    setting = [f"Domain: {request.domain}." if request.domain else "", f"Kind: {request.kind}." if request.kind else ""]
    if any(setting):
        lines.append(" ".join(s for s in setting if s))
    if examples:
        lines += ["Examples (write different ones):", *[f"- {e}" for e in examples]]
    lines.append(f"Each prompt must stand on its own. Answer with a numbered list of {count} prompts, "
                 "one per line, and nothing else.")
    system = f"{SYSTEM_PROMPT} You write them as {persona}." if persona else SYSTEM_PROMPT
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(lines)}]


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------

class PromptGenerator:
    """Plans requests, asks the generators, parses, filters and stores; one call per iteration."""

    def __init__(self, config: TrainConfig, generators: list, run_dir: str | Path,
                 seed_prompts: Sequence[tuple[str, str]] = (), count_tokens: Callable[[str], int] | None = None):
        self.config, self.gen, self.generators = config, config.generation, list(generators)
        self.spec, self.seeds = load_spec(config.judge.value_spec)
        self.store = PromptStore(Path(run_dir) / "prompts")
        self.count_tokens = count_tokens
        self.seed_pairs = [(f"seed-spec-{i:03d}", text) for i, text in enumerate(self.seeds.examples)]
        self.seed_pairs += [(f"seed-{prompt_id}", text) for prompt_id, text in seed_prompts]
        self.seed_texts = [text for _, text in self.seed_pairs]
        self.filter = None
        self._load_pool()

    def _load_pool(self) -> None:
        """The filter's pool: the seeds and every prompt the store holds."""
        if self.filter is not None:
            self.filter.close()
        self.filter = PromptFilter(self.gen.min_words, self.gen.max_words, self.gen.novelty_threshold,
                                   self.gen.num_workers, self.count_tokens, self.config.data.max_prompt_tokens)
        pool = self.store.load()
        self.filter.add_existing(self.seed_pairs)
        self.filter.add_existing([(row["id"], row["prompt"]) for row in pool])
        self.kept_texts = [row["prompt"] for row in pool]

    def rewind(self, last_iteration: int) -> None:
        """Forget the prompts kept after ``last_iteration``: a resumed or replayed run generates
        those iterations again and must find the pool as it stood then."""
        self.store.drop_after(last_iteration)
        self._load_pool()

    def plan(self, iteration: int) -> list[Request]:
        """Requests spread over generators in turn and over pillars evenly; domain, kind and
        examples drawn with a seed derived from (seed, iteration)."""
        rng = random.Random(self.config.seed * 1_000_003 + iteration)
        count = self.gen.requests_per_iteration
        pillars = self.spec.pillars
        requests = []
        for index in range(count):
            pillar = pillars[(iteration * count + index) % len(pillars)]
            domain = rng.choice(self.seeds.domains) if self.seeds.domains else ""
            kind = rng.choice(self.seeds.scenario_kinds) if self.seeds.scenario_kinds else ""
            requests.append(Request(index, index % len(self.generators), pillar.name, domain, kind,
                                    self._examples(rng)))
        return requests

    def _examples(self, rng: random.Random) -> list[str]:
        wanted = self.gen.examples_per_request
        from_kept = min(len(self.kept_texts), wanted // 2)
        from_seeds = min(len(self.seed_texts), wanted - from_kept)
        from_kept = min(len(self.kept_texts), wanted - from_seeds)
        examples = rng.sample(self.seed_texts, from_seeds) + rng.sample(self.kept_texts, from_kept)
        rng.shuffle(examples)
        return examples

    def persona(self, index: int) -> str | None:
        specs = self.gen.generators
        return specs[index].persona if index < len(specs) else None

    def fit(self, generator, request: Request) -> list[dict] | None:
        """The request's messages, dropping examples until prompt + answer fit the generator's
        context (when known); None when even no example fits."""
        pillar = next(p for p in self.spec.pillars if p.name == request.pillar)
        count = self.gen.prompts_per_request
        for keep in range(len(request.examples), -1, -1):
            messages = request_messages(self.spec, pillar, request, count, request.examples[:keep],
                                        persona=self.persona(request.generator))
            if generator.max_model_len is None:
                return messages
            if generator.prompt_tokens(messages) + self.gen.max_new_tokens <= generator.max_model_len:
                return messages
        return None

    def generate(self, iteration: int) -> tuple[list[dict], dict[str, float]]:
        """Generate, filter and store one iteration's prompts; returns the kept rows and counts."""
        started = time.perf_counter()
        requests = self.plan(iteration)
        answers: list[str | None] = [None] * len(requests)

        def run(index: int) -> tuple[int, float]:
            """Ask generator ``index`` its share of requests: (requests too long, seconds)."""
            generator = self.generators[index]
            mine = [(r, self.fit(generator, r)) for r in requests if r.generator == index]
            fitted = [(r, m) for r, m in mine if m is not None]
            start = time.perf_counter()
            seed = self.config.seed * 1_000_000_007 + iteration * 100_000 + index * 1_000
            texts = generator.generate([m for _, m in fitted], self.gen.max_new_tokens, self.gen.temperature,
                                       seed) if fitted else []
            for (request, _), text in zip(fitted, texts):
                answers[request.index] = text
            return len(mine) - len(fitted), time.perf_counter() - start

        failed_before = sum(g.errors.failed for g in self.generators)
        with ThreadPoolExecutor(len(self.generators)) as pool:
            results = list(pool.map(run, range(len(self.generators))))
        stats: Counter = Counter(requests=len(requests), requests_too_long=sum(r[0] for r in results),
                                 requests_failed=sum(g.errors.failed for g in self.generators) - failed_before)
        seconds = {g.name: r[1] for g, r in zip(self.generators, results)}
        generated = time.perf_counter()
        candidates: list[Candidate] = []
        dropped: Counter = Counter()
        for request, answer in zip(requests, answers):
            if answer is None:
                continue
            items = parse_prompts(answer)
            if not items:
                dropped["unparseable"] += 1
            candidates += [Candidate(text, request.pillar, request.domain, request.kind,
                                     self.generators[request.generator].name) for text in items]
        stored = [r["id"].rsplit("-", 1)[-1] for r in self.store.load(iteration)]
        offset = 1 + max((int(i) for i in stored if i.isdigit()), default=-1)  # a re-run continues the ids
        rows, filter_drops = self.filter.apply(candidates, lambda k: f"gen-{iteration:04d}-{offset + k:05d}")
        dropped.update(filter_drops)
        for row in rows:
            row["iteration"] = iteration
        stats.update({"candidates": len(candidates), "kept": len(rows)})
        stats.update({f"dropped.{reason}": dropped[reason] for reason in DROP_REASONS})
        stats.update({f"kept_by.{name}": sum(r["generator"] == name for r in rows) for name in
                      (g.name for g in self.generators)})
        self.store.save(iteration, rows, dict(stats))
        self.kept_texts += [row["prompt"] for row in rows]
        out = {k: float(v) for k, v in stats.items()}
        out.update({f"seconds.{name}": s for name, s in seconds.items()})
        out.update({"seconds.generate": generated - started, "seconds.filter": time.perf_counter() - generated,
                    "pool_size": float(len(self.filter.pool_ids))})
        return rows, out

    def close(self) -> None:
        self.filter.close()
        for generator in self.generators:
            generator.close()


class PromptSource:
    """Where each iteration's prompts come from: the prompts file (generation off), or fresh
    generated prompts, topped up from the prompts file when too few were kept."""

    def __init__(self, config: TrainConfig, fallback: PromptStream, generator: PromptGenerator | None = None):
        self.config, self.fallback, self.generator = config, fallback, generator

    @classmethod
    def start(cls, config: TrainConfig, fallback: PromptStream, rollout, run_dir: str | Path) -> PromptSource:
        if not config.generation.enabled:
            return cls(config, fallback)
        load_spec(config.judge.value_spec)  # a malformed spec fails before any engine starts
        generators = start_generators(config, rollout)
        try:
            generator = PromptGenerator(config, generators, run_dir, seed_prompts=fallback.prompts,
                                        count_tokens=policy_token_counter(config))
        except BaseException:
            for g in generators:
                g.close()
            raise
        return cls(config, fallback, generator)

    def for_iteration(self, iteration: int) -> tuple[PromptStream | FreshFirst, dict[str, float]]:
        """The prompts to train on in ``iteration`` (something with ``take(count)``) and counts."""
        if self.generator is None:
            return self.fallback, {}
        rows, stats = self.generator.generate(iteration)
        stats["topped_up"] = float(max(0, self.config.data.prompts_per_iteration - len(rows)))
        prompts = [(row["id"], row["prompt"]) for row in rows]
        if self.config.data.shuffle:
            random.Random(self.config.seed * 1_000_003 + iteration).shuffle(prompts)
        return FreshFirst(prompts, self.fallback), stats

    def rewind(self, last_iteration: int, stream_state: dict) -> None:
        """Back to the end of ``last_iteration``: the prompts file's stream position, and the
        generated pool without what was kept after it."""
        self.fallback.restore(stream_state)
        if self.generator is not None:
            self.generator.rewind(last_iteration)

    def close(self) -> None:
        if self.generator is not None:
            self.generator.close()


class FreshFirst:
    """One iteration's prompts: the freshly generated ones, each once, then the prompts file's
    stream (tops up the first round, and serves refill rounds once the fresh ones run out)."""

    def __init__(self, fresh: list[tuple[str, str]], fallback: PromptStream):
        self.queue, self.fallback, self.from_fallback = list(fresh), fallback, 0

    @property
    def skipped_too_long(self) -> int:
        return self.fallback.skipped_too_long

    def take(self, count: int) -> list[tuple[str, str]]:
        taken, self.queue = self.queue[:count], self.queue[count:]
        extra = self.fallback.take(count - len(taken)) if len(taken) < count else []
        self.from_fallback += len(extra)
        return taken + extra


def policy_token_counter(config: TrainConfig) -> Callable[[str], int]:
    """Tokens of a prompt as the rollout engines see it (chat template included)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model.path, trust_remote_code=config.model.trust_remote_code)
    return lambda text: len(chat_token_ids(tokenizer, [{"role": "user", "content": text}]))
