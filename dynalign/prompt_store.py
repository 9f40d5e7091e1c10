"""Generated prompts after the generators: parsing their answers, the filter chain, and storage.

Answers are parsed permissively (numbered lists, bullets, stray text), then filtered in this
order, every drop counted by reason:

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
the pool and the nearest prompt's id.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dynalign import files
from dynalign.novelty import NoveltyFilter

DROP_REASONS = ("unparseable", "empty", "meta", "too_short", "too_long", "duplicate", "not_novel")


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
