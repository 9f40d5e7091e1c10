"""ROUGE-L novelty filter for self-generated training prompts.

A candidate prompt is *kept* iff its ROUGE-L F-measure against every prompt
already in the pool is below ``threshold``; candidates are decided greedily in
arrival order and kept ones join the pool.  Decisions are bit-for-bit
identical to the naive loop over ``rouge_score.rouge_scorer.RougeScorer(
["rougeL"])`` (default tokenizer, no stemmer) -- see :func:`naive_filter`,
the reference used by the tests and ``benchmarks/bench_novelty.py``.

Reproducing rouge_score exactly
-------------------------------
* Tokenizer (``rouge_score.tokenize.tokenize``): ``text.lower()``, every run of
  characters outside ``[a-z0-9]`` becomes one space, split, drop empties.
  Everything non-ASCII is therefore *dropped* (Chinese, Cyrillic, accented
  letters: "café" -> ["caf"], "naïve" -> ["na", "ve"]), except characters whose
  ``str.lower()`` contains ASCII ("İ" -> "i̇" -> ["i"], Kelvin sign "K" ->
  ["k"]).  An empty, whitespace-only or all-non-English text has no tokens.
* ``_score_lcs``: if either token list is empty the F-measure is 0; otherwise
  ``p = lcs / len(prediction)``, ``r = lcs / len(target)`` and
  ``scoring.fmeasure``: ``2 * p * r / (p + r)`` if ``p + r > 0`` else 0.0.
  :func:`rouge_l_f` performs the same float operations in the same order.
* Symmetry: the LCS is symmetric and so is the float F-measure: swapping
  target and prediction swaps ``p`` and ``r``; ``2 * p`` is exact, IEEE
  multiplication and addition are commutative, so ``(2p)r == (2r)p`` and
  ``p + r == r + p`` bit for bit.  Which text is the target does not matter.

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

How it is fast
--------------
* Each text is tokenised once; tokens are mapped to int ids (0 is reserved).
* Bag bound: ``LCS <= sum_t min(count_a(t), count_b(t))``, computed for all
  pool prompts at once from an inverted index (token -> posting arrays of
  pool positions and counts); pool prompts sharing no token are never
  touched.  It also implies the length bound ``LCS <= min(m, n)``.  Since
  the float F is strictly increasing in the LCS for fixed lengths, F computed
  at the bound is a valid upper bound on the exact float F.
* Exact LCS only for pool prompts whose bound can still reach the best score:
  first for the few with the highest bounds, then for those whose bound is
  ``>=`` the best exact score found so far.  The LCS uses the bit-parallel
  algorithm of Allison-Dix / Hyyrö (bit masks over the candidate's
  positions), with Python ints for a few pairs and vectorised over many pool
  prompts in numpy ``uint64`` words (with carry propagation for candidates
  longer than 64 tokens).

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

import multiprocessing
import re
import sys
import weakref
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

__all__ = [
    "NoveltyDecision",
    "NoveltyFilter",
    "naive_filter",
    "rouge_l_f",
    "rouge_tokens",
]

_NON_ALPHANUM_RE = re.compile(r"[^a-z0-9]+")  # rouge_score.tokenize.NON_ALPHANUM_PATTERN

# Below this many pool prompts to score exactly, Python-int bit-parallel LCS per
# pair is cheaper than the numpy-vectorised version (fixed per-call overhead).
_PY_LCS_MAX = 32
# Number of highest-bound pool prompts scored first to get a good pruning score.
_TOP_K = 8

# A token's posting becomes a dense count vector once it has >= _DENSE_MIN
# entries and covers >= 1/_DENSE_RATIO of the pool.
_DENSE_MIN = 32
_DENSE_RATIO = 8
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)
_NP_CHUNK = 1 << 21


def rouge_tokens(text: str) -> list[str]:
    """Tokens exactly as ``rouge_score``'s default tokenizer (no stemmer).

    Lower-case, replace every run of non-``[a-z0-9]`` characters with a space,
    split on whitespace.  After the substitution only ``[a-z0-9 ]`` remain, so
    ``str.split()`` equals rouge_score's ``SPACES_RE.split`` + validity filter.
    """
    return _NON_ALPHANUM_RE.sub(" ", text.lower()).split()


def _fmeasure(lcs: int, m: int, n: int) -> float:
    """``rouge_score`` F-measure for ``lcs`` between a target of ``m`` tokens and a
    prediction of ``n`` tokens, with the same float operations in the same order."""
    if not m or not n:
        return 0.0
    precision = lcs / n
    recall = lcs / m
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def _lcs_len(a: Sequence, b: Sequence) -> int:
    """LCS length, bit-parallel (Allison-Dix / Hyyrö) over Python ints."""
    if len(a) < len(b):
        a, b = b, a
    masks: dict = {}
    for i, t in enumerate(b):
        masks[t] = masks.get(t, 0) | (1 << i)
    full = (1 << len(b)) - 1
    s = full
    get = masks.get
    for t in a:
        mk = get(t)
        if mk is not None:
            u = s & mk
            s = (s + u) | (s - u)
    return len(b) - (s & full).bit_count()


def rouge_l_f(a_tokens: Sequence[str], b_tokens: Sequence[str]) -> float:
    """ROUGE-L F-measure of two token lists (e.g. from :func:`rouge_tokens`).

    Identical (``==``, bit for bit) to ``RougeScorer(["rougeL"]).score(target,
    prediction)["rougeL"].fmeasure`` on the texts, whichever of the two is the
    target: the float F-measure is symmetric (see the module docstring).
    Returns 0.0 when either list is empty (rouge_score returns the int 0).
    """
    if not a_tokens or not b_tokens:
        return 0.0
    return _fmeasure(_lcs_len(a_tokens, b_tokens), len(a_tokens), len(b_tokens))


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


# --------------------------------------------------------------------------- #
# Shard: a set of pool prompts with an inverted index and exact max-F queries.
# --------------------------------------------------------------------------- #


class _Posting:
    """Pool positions holding one token and its counts there.  Sparse arrays
    while the token is rare; a dense count vector over all pool positions once
    it is frequent (contiguous adds beat scattered ones)."""

    __slots__ = ("pos", "cnt", "size", "maxcnt", "dense")

    def __init__(self) -> None:
        self.pos = np.empty(8, dtype=np.int32)
        self.cnt = np.empty(8, dtype=np.int32)
        self.size = 0
        self.maxcnt = 0
        self.dense: np.ndarray | None = None

    def append(self, p: int, c: int, pool_len: int) -> None:
        if c > self.maxcnt:
            self.maxcnt = c
        self.size += 1
        if self.dense is None and self.size >= _DENSE_MIN and self.size * _DENSE_RATIO >= pool_len:
            self.dense = np.zeros(max(64, 2 * pool_len), dtype=np.int32)
            self.dense[self.pos[: self.size - 1]] = self.cnt[: self.size - 1]
            self.pos = self.cnt = None
        if self.dense is not None:
            if p >= len(self.dense):
                self.dense = np.concatenate([self.dense, np.zeros_like(self.dense)])
            self.dense[p] = c
            return
        i = self.size - 1
        if i == len(self.pos):
            self.pos = np.concatenate([self.pos, np.empty_like(self.pos)])
            self.cnt = np.concatenate([self.cnt, np.empty_like(self.cnt)])
        self.pos[i] = p
        self.cnt[i] = c


class _Shard:
    """Pool prompts (as token-id lists, with their global pool indices)."""

    def __init__(self) -> None:
        self.gidx: list[int] = []  # global pool index, increasing
        self.toks: list[list[int]] = []
        self.postings: dict[int, _Posting] = {}
        self._lens = np.empty(64, dtype=np.int64)
        self._offs = np.empty(64, dtype=np.int64)
        self._flat = np.zeros(1024, dtype=np.int32)  # flat[0] = 0: padding token
        self._flat_size = 1
        self._gidx_arr = np.empty(64, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.toks)

    def add(self, gidx: int, ids: list[int]) -> None:
        if self.gidx and gidx <= self.gidx[-1]:
            raise ValueError(f"pool index {gidx} added out of order")
        p = len(self.toks)
        self.gidx.append(gidx)
        self.toks.append(ids)
        if p == len(self._lens):
            self._lens = np.concatenate([self._lens, np.empty_like(self._lens)])
            self._offs = np.concatenate([self._offs, np.empty_like(self._offs)])
            self._gidx_arr = np.concatenate([self._gidx_arr, np.empty_like(self._gidx_arr)])
        n = len(ids)
        while self._flat_size + n > len(self._flat):
            self._flat = np.concatenate([self._flat, np.zeros_like(self._flat)])
        self._flat[self._flat_size : self._flat_size + n] = ids
        self._offs[p] = self._flat_size
        self._lens[p] = n
        self._gidx_arr[p] = gidx
        self._flat_size += n
        postings = self.postings
        for t, c in Counter(ids).items():
            post = postings.get(t)
            if post is None:
                post = postings[t] = _Posting()
            post.append(p, c, p + 1)

    # -- queries ------------------------------------------------------------ #

    def _bounds(self, cand: list[int]):
        """(positions sharing a token with ``cand``, F upper bounds there)."""
        n = len(cand)
        k = len(self.toks)
        if not n or not k:
            return None, None
        inter = np.zeros(k, dtype=np.int32)
        for t, c in Counter(cand).items():
            post = self.postings.get(t)
            if post is None:
                continue
            if post.dense is not None:
                d = post.dense[:k]  # may be shorter: later prompts lack the token
                if c >= post.maxcnt:
                    inter[: len(d)] += d
                else:
                    inter[: len(d)] += np.minimum(d, c)
                continue
            pos = post.pos[: post.size]
            if c >= post.maxcnt:
                inter[pos] += post.cnt[: post.size]
            else:
                inter[pos] += np.minimum(post.cnt[: post.size], c)
        nz = np.flatnonzero(inter)
        if not len(nz):
            return None, None
        # F at the bag bound (>= LCS), same float ops as _fmeasure: an upper
        # bound on the exact float F, which is increasing in the LCS.
        bound = inter[nz].astype(np.float64)
        p = bound / n
        r = bound / self._lens[nz]
        return nz, 2 * p * r / (p + r)

    @staticmethod
    def _cmasks(cand: list[int]) -> dict[int, int]:
        cmasks: dict[int, int] = {}
        for i, t in enumerate(cand):
            cmasks[t] = cmasks.get(t, 0) | (1 << i)
        return cmasks

    def _score(self, sel: np.ndarray, cand: list[int], cmasks: dict[int, int]):
        if len(sel) <= _PY_LCS_MAX:
            return self._score_py(sel, cand, cmasks)
        return self._score_np(sel, cand, cmasks)

    def best(self, cand: list[int]) -> tuple[float, int]:
        """(max F over this shard, first global index attaining it or -1 if 0)."""
        nz, fub = self._bounds(cand)
        if nz is None:
            return 0.0, -1
        cmasks = self._cmasks(cand)
        if len(nz) <= _PY_LCS_MAX:
            return self._best_of(self._score_py(nz, cand, cmasks))
        # Exact scores for the few highest bounds first, then only where the
        # bound reaches the best exact score found (ties need the first index).
        top = np.argpartition(-fub, _TOP_K)[:_TOP_K]
        best_f, best_g = self._best_of(self._score_py(nz[top], cand, cmasks))
        rest = fub >= best_f
        rest[top] = False
        sel = nz[rest]
        if not len(sel):
            return best_f, best_g
        f2, g2 = self._best_of(self._score(sel, cand, cmasks))
        if f2 > best_f or (f2 == best_f and g2 < best_g):
            return f2, g2
        return best_f, best_g

    def scores_above(self, cand: list[int], floor: float) -> list[tuple[float, int]]:
        """All (F, global index) with F > ``floor``, in pool order."""
        nz, fub = self._bounds(cand)
        if nz is None:
            return []
        sel = nz[fub > floor]
        if not len(sel):
            return []
        return [x for x in self._score(sel, cand, self._cmasks(cand)) if x[0] > floor]

    def _best_of(self, scored: list[tuple[float, int]]) -> tuple[float, int]:
        best_f, best_g = 0.0, -1
        for f, g in scored:
            if f > best_f or (f == best_f and g < best_g):
                best_f, best_g = f, g
        return best_f, best_g

    def _score_py(self, sel: np.ndarray, cand: list[int], cmasks: dict[int, int]):
        n = len(cand)
        full = (1 << n) - 1
        get = cmasks.get
        out = []
        for p in sel.tolist():
            toks = self.toks[p]
            s = full
            for t in toks:
                mk = get(t)
                if mk is not None:
                    u = s & mk
                    s = (s + u) | (s - u)
            lcs = n - (s & full).bit_count()
            out.append((_fmeasure(lcs, len(toks), n), self.gidx[p]))
        return out

    def _score_np(self, sel: np.ndarray, cand: list[int], cmasks: dict[int, int]):
        """Vectorised bit-parallel LCS of ``cand`` against the pool prompts ``sel``."""
        n = len(cand)
        nwords = (n + 63) // 64
        keys = np.fromiter(cmasks.keys(), dtype=np.int32, count=len(cmasks))
        order = np.argsort(keys)
        keys = keys[order]
        kmask = np.zeros((len(keys), nwords), dtype=np.uint64)
        for row, mk in enumerate(cmasks[int(x)] for x in keys):
            for w in range(nwords):
                kmask[row, w] = (mk >> (64 * w)) & 0xFFFFFFFFFFFFFFFF

        # Bound the (positions x prompts x words) temporaries to ~_NP_CHUNK items.
        step = max(1, _NP_CHUNK // (int(self._lens[sel].max()) * nwords))
        out = []
        for lo in range(0, len(sel), step):
            out += self._score_np_chunk(sel[lo : lo + step], n, nwords, keys, kmask)
        return out

    def _score_np_chunk(self, sel, n, nwords, keys, kmask):
        lens = self._lens[sel]
        maxm = int(lens.max())
        ar = np.arange(maxm)
        # Token matrix, one row per position (transposed), padding -> token 0.
        pos = np.where(ar[:, None] < lens[None, :], self._offs[sel][None, :] + ar[:, None], 0)
        tmat = self._flat[pos]
        kpos = np.searchsorted(keys, tmat)
        np.minimum(kpos, len(keys) - 1, out=kpos)
        hit = keys[kpos] == tmat

        last_bits = n - 64 * (nwords - 1)
        last_mask = _ALL if last_bits == 64 else np.uint64((1 << last_bits) - 1)
        lcs = np.full(len(sel), n, dtype=np.int64)
        if nwords == 1:
            mm = np.where(hit, kmask[kpos, 0], np.uint64(0))
            s = np.full(len(sel), _ALL, dtype=np.uint64)
            for row in mm:
                u = s & row
                s = (s + u) | (s - u)
            lcs -= np.bitwise_count(s & last_mask).astype(np.int64)
        else:
            mm = np.where(hit[..., None], kmask[kpos], np.uint64(0))  # (maxm, len(sel), W)
            s = np.full((nwords, len(sel)), _ALL, dtype=np.uint64)
            for row in mm:
                carry = np.zeros(len(sel), dtype=np.uint64)
                for w in range(nwords):
                    sw = s[w]
                    u = sw & row[:, w]
                    t1 = sw + u
                    c1 = t1 < sw
                    t2 = t1 + carry
                    c2 = t2 < t1
                    s[w] = t2 | (sw - u)
                    carry = (c1 | c2).astype(np.uint64)
            for w in range(nwords):
                word = s[w] if w < nwords - 1 else s[w] & last_mask
                lcs -= np.bitwise_count(word).astype(np.int64)

        # F-measure, same float operations as _fmeasure (0.0 when lcs == 0).
        lcs_f = lcs.astype(np.float64)
        p = lcs_f / n
        r = lcs_f / lens
        pr = p + r
        f = np.zeros(len(sel), dtype=np.float64)
        np.divide(2 * p * r, pr, out=f, where=pr > 0)
        return list(zip(f.tolist(), self._gidx_arr[sel].tolist(), strict=True))

    def block_step(self, block: list[list[int]], part: int, nparts: int):
        """One parallel round for a worker owning this shard.

        Returns ``(best, within)``: ``best[j]`` = :meth:`best` of every block
        candidate against this shard; ``within[j]`` for the block positions
        ``j % nparts == part``: all ``(F, i)`` with ``i < j`` a block position
        and ``F > best[j][0]`` (a superset of what can beat the whole pool; the
        main process keeps those ``i`` that were kept).
        """
        best = [self.best(c) for c in block]
        local = _Shard()
        within: dict[int, list[tuple[float, int]]] = {}
        for j, c in enumerate(block):
            if j % nparts == part and j:
                within[j] = local.scores_above(c, best[j][0])
            local.add(j, c)
        return best, within


# --------------------------------------------------------------------------- #
# Worker backends (one stateful shard per worker).
# --------------------------------------------------------------------------- #

_WORKER_SHARD: _Shard | None = None


def _proc_init() -> None:
    global _WORKER_SHARD
    _WORKER_SHARD = _Shard()


def _proc_step(new_entries: list[tuple[int, list[int]]], block, part: int, nparts: int):
    shard = _WORKER_SHARD
    assert shard is not None
    for g, ids in new_entries:
        shard.add(g, ids)
    return shard.block_step(block, part, nparts)


class _ProcessBackend:
    def __init__(self, num_workers: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._execs = [
            ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_proc_init)
            for _ in range(num_workers)
        ]

    def step(self, new_entries, block):
        n = len(self._execs)
        futs = [
            ex.submit(_proc_step, entries, block, w, n)
            for w, (ex, entries) in enumerate(zip(self._execs, new_entries, strict=True))
        ]
        return [f.result() for f in futs]

    def close(self) -> None:
        for ex in self._execs:
            ex.shutdown(wait=True, cancel_futures=True)
        self._execs = []


class _RayShard:
    def __init__(self) -> None:
        self.shard = _Shard()

    def step(self, new_entries, block, part: int, nparts: int):
        for g, ids in new_entries:
            self.shard.add(g, ids)
        return self.shard.block_step(block, part, nparts)


class _RayBackend:
    def __init__(self, num_workers: int) -> None:
        import ray

        self._ray = ray
        actor_cls = ray.remote(num_cpus=1)(_RayShard)
        self._actors = [actor_cls.remote() for _ in range(num_workers)]

    def step(self, new_entries, block):
        block_ref = self._ray.put(block)
        n = len(self._actors)
        refs = [
            a.step.remote(entries, block_ref, w, n)
            for w, (a, entries) in enumerate(zip(self._actors, new_entries, strict=True))
        ]
        return self._ray.get(refs)

    def close(self) -> None:
        for a in self._actors:
            try:
                self._ray.kill(a)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        self._actors = []


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")  # never import ray just to find out
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())


# --------------------------------------------------------------------------- #
# Public filter.
# --------------------------------------------------------------------------- #


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
        self._shard = _Shard() if num_workers == 1 else None
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
            use_ray = self.backend == "ray" or (self.backend == "auto" and _ray_initialized())
            if use_ray:
                self._workers = _RayBackend(self.num_workers)
            else:
                self._workers = _ProcessBackend(self.num_workers)
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
