"""A pool of prompts indexed for one query: the best ROUGE-L F (``dynalign.rouge``) of a candidate
against every prompt in it, exactly, without scoring most of them (the engine of
``dynalign.novelty.NoveltyFilter``).

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
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from dynalign.rouge import fmeasure

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


class Posting:
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


class Shard:
    """Pool prompts (as token-id lists, with their global pool indices)."""

    def __init__(self) -> None:
        self.gidx: list[int] = []  # global pool index, increasing
        self.toks: list[list[int]] = []
        self.postings: dict[int, Posting] = {}
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
                post = postings[t] = Posting()
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
        # F at the bag bound (>= LCS), same float ops as fmeasure: an upper
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
            out.append((fmeasure(lcs, len(toks), n), self.gidx[p]))
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

        # F-measure, same float operations as fmeasure (0.0 when lcs == 0).
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
        local = Shard()
        within: dict[int, list[tuple[float, int]]] = {}
        for j, c in enumerate(block):
            if j % nparts == part and j:
                within[j] = local.scores_above(c, best[j][0])
            local.add(j, c)
        return best, within
