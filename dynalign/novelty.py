"""ROUGE-L novelty filter for self-generated training prompts.

A candidate prompt is *kept* iff its ROUGE-L F-measure against every prompt
already in the pool is below ``threshold``; candidates are decided greedily in
arrival order and kept ones join the pool.  Decisions are bit-for-bit
identical to the naive loop over ``rouge_score.rouge_scorer.RougeScorer(
["rougeL"])`` (default tokenizer, no stemmer) -- see :func:`naive_filter`,
the reference used by the tests and ``benchmarks/bench_novelty.py``.

The exact ROUGE-L is ``dynalign.rouge``; the pool index that makes it fast is
``dynalign.novelty_index``; the parallel workers are ``dynalign.novelty_workers``.

Reported score
--------------
``NoveltyDecision.best_score`` is the exact maximum ROUGE-L F of the candidate
against the whole pool at decision time (existing prompts + candidates kept
before it), for kept *and* rejected candidates; the decision is
``kept = best_score < threshold``.  ``nearest_index`` is the smallest pool
index attaining that maximum (``numpy.argmax`` semantics), or ``None`` when
``best_score == 0`` (the pool is empty, or no pool prompt shares a token with
the candidate).  A rejected candidate therefore reports the highest score
that rejects it and the first pool prompt with that score.

Parallelism
-----------
The greedy order makes candidate *j* depend on all earlier decisions, so with
``num_workers > 1`` candidates go in blocks of ``block_size``.  The pool is
sharded round-robin over ``num_workers`` stateful workers; in one round trip
each worker (a) scores every block candidate against its shard (the pool as
of the block start: max F and first index) and (b) for its share of block
positions ``j``, lists the earlier block candidates ``i < j`` scoring above
(a). The main process then resolves the block sequentially in pure Python
(max over shards; an earlier block candidate counts only if it was kept),
and ships the newly kept prompts to their shards with the next block.
Workers are dedicated single-process ``ProcessPoolExecutor``s (one per shard,
so the shard state lives in that process; "spawn" start method, so scripts
need the usual ``if __name__ == "__main__":`` guard) or, when Ray is
initialised (``backend="auto"`` or ``"ray"``), one Ray actor per shard.  The
per-candidate cost has a fixed part (numpy calls, top-k LCS) that every
worker pays again, so this only pays off for large pools (tens of thousands
of prompts); ``num_workers=1`` (the default) is the single-process fast path.
Decisions and scores do not depend on ``num_workers`` or ``block_size``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dynalign.novelty_index import Shard
from dynalign.novelty_workers import ProcessBackend, RayBackend, ray_initialized
from dynalign.rouge import rouge_l_f, rouge_tokens

__all__ = [
    "NoveltyDecision",
    "NoveltyFilter",
    "naive_filter",
    "rouge_l_f",
    "rouge_tokens",
]


@dataclass
class NoveltyDecision:
    """Outcome for one candidate.

    kept: ``best_score < threshold``.
    best_score: max ROUGE-L F against the pool at decision time (0.0 if empty).
    nearest_index: first pool index attaining ``best_score`` (pool = existing
        prompts + kept candidates, in the order added); ``None`` if
        ``best_score == 0``.
    """

    kept: bool
    best_score: float
    nearest_index: int | None


class NoveltyFilter:
    """Greedy ROUGE-L novelty filter; decisions identical to :func:`naive_filter`.

    Args:
        threshold: a candidate is kept iff its max ROUGE-L F against the pool is
            ``< threshold``; must be in (0, 1].
        num_workers: 1 = single-process fast path (default). >1 shards the pool
            over that many worker processes / Ray actors (see module docstring);
            only worth it for large pools (tens of thousands of prompts).
        backend: ``"auto"`` (Ray actors if Ray is initialised, else processes),
            ``"process"`` or ``"ray"``; ignored when ``num_workers == 1``.
        block_size: candidates per parallel round when ``num_workers > 1``.

    With ``num_workers > 1`` call :meth:`close` (or use ``with``) to stop the
    workers; the pool survives and a later :meth:`filter` restarts them.
    Not thread-safe.
    """

    def __init__(
        self,
        threshold: float = 0.7,
        num_workers: int = 1,
        *,
        backend: str = "auto",
        block_size: int = 256,
    ) -> None:
        if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
            raise ValueError(
                f"threshold={threshold!r} is out of range; expected 0 < threshold <= 1"
            )
        if not (isinstance(num_workers, int) and num_workers >= 1):
            raise ValueError(f"num_workers={num_workers!r} is out of range; expected an int >= 1")
        if backend not in ("auto", "process", "ray"):
            raise ValueError(f"backend={backend!r} is invalid; expected 'auto', 'process' or 'ray'")
        if not (isinstance(block_size, int) and block_size >= 1):
            raise ValueError(f"block_size={block_size!r} is out of range; expected an int >= 1")
        self.threshold = float(threshold)
        self.num_workers = num_workers
        self.backend = backend
        self.block_size = block_size
        self._vocab: dict[str, int] = {}
        self._size = 0
        self._shard = Shard() if num_workers == 1 else None
        # Parallel mode: entries not yet shipped to their worker shard.
        self._pending: list[list[tuple[int, list[int]]]] = [[] for _ in range(num_workers)]
        self._workers = None
        self._finalizer = None
        # Parallel mode: the whole pool (token ids), to re-seed restarted workers.
        self._all_ids: list[list[int]] = []

    # -- pool --------------------------------------------------------------- #

    @property
    def pool_size(self) -> int:
        """Number of prompts in the pool (existing + kept)."""
        return self._size

    def _ids(self, text: str) -> list[int]:
        vocab = self._vocab
        out = []
        for tok in rouge_tokens(text):
            i = vocab.get(tok)
            if i is None:
                i = vocab[tok] = len(vocab) + 1  # 0 is the padding id
            out.append(i)
        return out

    def _add_ids(self, ids: list[int]) -> int:
        g = self._size
        self._size += 1
        if self._shard is not None:
            self._shard.add(g, ids)
        else:
            self._all_ids.append(ids)
            self._pending[g % self.num_workers].append((g, ids))
        return g

    def add_existing(self, texts: Iterable[str]) -> None:
        """Add prompts kept in earlier iterations to the pool, unconditionally."""
        for text in texts:
            self._add_ids(self._ids(text))

    # -- filtering ---------------------------------------------------------- #

    def filter(self, candidates: Sequence[str]) -> list[NoveltyDecision]:
        """Decide candidates greedily in order; kept ones join the pool."""
        cands = [self._ids(c) for c in candidates]
        if self._shard is not None:
            return [self._decide_local(ids) for ids in cands]
        out: list[NoveltyDecision] = []
        for start in range(0, len(cands), self.block_size):
            out.extend(self._filter_block(cands[start : start + self.block_size]))
        return out

    def _decide_local(self, ids: list[int]) -> NoveltyDecision:
        f, g = self._shard.best(ids)
        kept = f < self.threshold
        if kept:
            self._add_ids(ids)
        return NoveltyDecision(kept, f, g if g >= 0 else None)

    def _filter_block(self, block: list[list[int]]) -> list[NoveltyDecision]:
        workers = self._get_workers()
        pending, self._pending = self._pending, [[] for _ in range(self.num_workers)]
        results = workers.step(pending, block)
        nparts = len(results)
        block_gidx: list[int] = []  # pool index of each block position (-1: rejected)
        out = []
        for j, ids in enumerate(block):
            best_f, best_g = 0.0, -1
            for res, _ in results:
                f, g = res[j]
                if f > best_f or (f == best_f and 0 <= g < best_g):
                    best_f, best_g = f, g
            # Candidates kept earlier in this block come later in the pool: only
            # a strictly higher score replaces the pool's best (in block order,
            # so the first of equal scores wins).
            for f, i in results[j % nparts][1].get(j, ()):
                if f > best_f and block_gidx[i] >= 0:
                    best_f, best_g = f, block_gidx[i]
            kept = best_f < self.threshold
            block_gidx.append(self._add_ids(ids) if kept else -1)
            out.append(NoveltyDecision(kept, best_f, best_g if best_g >= 0 else None))
        return out

    def _get_workers(self):
        if self._workers is None:
            use_ray = self.backend == "ray" or (self.backend == "auto" and ray_initialized())
            if use_ray:
                self._workers = RayBackend(self.num_workers)
            else:
                self._workers = ProcessBackend(self.num_workers)
            self._finalizer = weakref.finalize(self, self._workers.close)
        return self._workers

    def close(self) -> None:
        """Stop the worker processes / actors.  The pool is kept: a later
        :meth:`filter` starts fresh workers and re-ships it to them."""
        if self._finalizer is not None:
            self._finalizer()
        if self._workers is not None:
            self._pending = [[] for _ in range(self.num_workers)]
            for g, ids in enumerate(self._all_ids):
                self._pending[g % self.num_workers].append((g, ids))
        self._workers = None
        self._finalizer = None

    def __enter__(self) -> NoveltyFilter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- #
# Reference implementation.
# --------------------------------------------------------------------------- #


def naive_filter(
    candidates: Iterable[str], existing: Iterable[str] = (), threshold: float = 0.7
) -> list[NoveltyDecision]:
    """The reference loop over ``rouge_score`` (slow: O(pool) full scorings per
    candidate, re-tokenising both texts every time).  Same reporting semantics
    as :class:`NoveltyFilter`: max F, first pool index attaining it, ``None``
    if that max is 0."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pool = list(existing)
    out = []
    for cand in candidates:
        best, nearest = 0.0, None
        for i, kept in enumerate(pool):
            f = scorer.score(target=kept, prediction=cand)["rougeL"].fmeasure
            if f > best:
                best, nearest = f, i
        keep = best < threshold
        if keep:
            pool.append(cand)
        out.append(NoveltyDecision(keep, float(best), nearest))
    return out
