"""ROUGE-L exactly as ``rouge_score`` computes it (``RougeScorer(["rougeL"])``, default tokenizer,
no stemmer), bit for bit, without its per-call overhead: the tokenizer, the LCS and the F-measure.

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
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_NON_ALPHANUM_RE = re.compile(r"[^a-z0-9]+")  # rouge_score.tokenize.NON_ALPHANUM_PATTERN


def rouge_tokens(text: str) -> list[str]:
    """Tokens exactly as ``rouge_score``'s default tokenizer (no stemmer).

    Lower-case, replace every run of non-``[a-z0-9]`` characters with a space,
    split on whitespace.  After the substitution only ``[a-z0-9 ]`` remain, so
    ``str.split()`` equals rouge_score's ``SPACES_RE.split`` + validity filter.
    """
    return _NON_ALPHANUM_RE.sub(" ", text.lower()).split()


def fmeasure(lcs: int, m: int, n: int) -> float:
    """``rouge_score`` F-measure for ``lcs`` between a target of ``m`` tokens and a
    prediction of ``n`` tokens, with the same float operations in the same order."""
    if not m or not n:
        return 0.0
    precision = lcs / n
    recall = lcs / m
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def lcs_len(a: Sequence, b: Sequence) -> int:
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
    return fmeasure(lcs_len(a_tokens, b_tokens), len(a_tokens), len(b_tokens))
