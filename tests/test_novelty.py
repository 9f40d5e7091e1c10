"""dynalign.novelty: exact equivalence with the naive rouge_score loop."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
from rouge_score import rouge_scorer
from rouge_score import tokenize as rs_tokenize

from dynalign import novelty_index, novelty_workers, rouge
from dynalign.novelty import (
    NoveltyDecision,
    NoveltyFilter,
    naive_filter,
    rouge_l_f,
    rouge_tokens,
)

SCORER = rouge_scorer.RougeScorer(["rougeL"])

TRICKY = [
    "",
    " ",
    "   \t\n ",
    "!!!",
    "...?",
    "Hello, World!",
    "hello world",
    "HELLO   WORLD",
    "hello-world",
    "don't stop",
    "e.g. the U.S.A. in 2024",
    "3.14159 is pi; 42 is the answer",
    "a_b c__d",
    "tab\tseparated\nnew line\r\ncrlf",
    "café naïve façade",
    "İstanbul",
    "KELVIN \u212a sign",
    "straße ß",
    "ＡＢＣ 全角 fullwidth",
    "社区的价值观是什么",
    "Что такое справедливость?",
    "مجتمع عادل",
    "Gemeinschaft und Verantwortung — wie?",
    "emoji 😀 in the middle 👍",
    "x",
    "the the the the",
    "the cat sat on the mat",
    "The cat, sat on THE mat!!",
    "on the mat the cat sat",
    "a b c d",
    "a b x y",
    "1 2 3 4 5 6 7 8 9 10",
    "zero-width\u200bjoiner",
    "non\u00a0breaking space",
]

# --------------------------------------------------------------------------- #
# Synthetic candidate generator: near-duplicates from a small vocabulary.
# --------------------------------------------------------------------------- #

VOCAB = (
    "the a of to and in we our people community value values fairness care honesty "
    "trust freedom duty share help should how why when what neighbors future children "
    "elders water food land work justice respect kindness harm protect choose balance"
).split()
NON_EN = [
    "社区的价值观是什么",
    "Что такое справедливость?",
    "Gemeinschaft und Verantwortung — wie?",
    "café naïve façade",
    "İstanbul KELVIN \u212a",
    "ß straße",
    "ＡＢＣ　全角",
    "مجتمع عادل",
]


def make_candidates(n: int, seed: int, nbases: int = 40) -> list[str]:
    rng = random.Random(seed)
    bases = [[rng.choice(VOCAB) for _ in range(rng.randint(5, 14))] for _ in range(nbases)]
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.02:
            out.append(rng.choice(["", "   ", "\n\t", "!!!", "...?"]))
            continue
        if r < 0.05:
            extra = " " + " ".join(rng.choice(bases)) if rng.random() < 0.5 else ""
            out.append(rng.choice(NON_EN) + extra)
            continue
        w = list(rng.choice(bases))
        for _ in range(rng.randint(0, 4)):  # word drops / insertions / swaps
            op = rng.random()
            if op < 0.35 and len(w) > 1:
                del w[rng.randrange(len(w))]
            elif op < 0.7:
                w.insert(rng.randrange(len(w) + 1), rng.choice(VOCAB))
            elif len(w) > 1:
                i, j = rng.randrange(len(w)), rng.randrange(len(w))
                w[i], w[j] = w[j], w[i]
        if rng.random() < 0.01:  # long prompt: > 64 tokens
            w = w * rng.randint(5, 12)
        text = " ".join(w)
        r2 = rng.random()
        if r2 < 0.15:
            text = text.upper()
        elif r2 < 0.3:
            text = text.capitalize() + rng.choice(["?", "!", ".", " -- really?", "..."])
        elif r2 < 0.4:
            text = text.replace(" ", rng.choice([",  ", "\t", " - ", "/", "'s "]), 2)
        if rng.random() < 0.05:
            text += " " + str(rng.randint(0, 99))
        out.append(text)
    return out


def _dp_lcs(a, b) -> int:
    return rouge_scorer._lcs_table(a, b)[-1][-1]


# --------------------------------------------------------------------------- #
# Tokenizer and ROUGE-L F.
# --------------------------------------------------------------------------- #


def test_rouge_tokens_identical_to_rouge_score():
    texts = TRICKY + make_candidates(300, seed=3)
    for text in texts:
        assert rouge_tokens(text) == rs_tokenize.tokenize(text, None), repr(text)
        assert rouge_tokens(text) == SCORER._tokenizer.tokenize(text), repr(text)
    # Non-English text is dropped; some non-ASCII letters lower-case to ASCII.
    assert rouge_tokens("社区的价值观是什么") == []
    assert rouge_tokens("café naïve") == ["caf", "na", "ve"]
    assert rouge_tokens("İstanbul \u212a") == ["i", "stanbul", "k"]
    assert rouge_tokens("   ") == [] and rouge_tokens("") == []
    assert rouge_tokens("Don't STOP, 2024!") == ["don", "t", "stop", "2024"]


def test_rouge_l_f_identical_to_rouge_score_and_symmetric():
    texts = TRICKY + make_candidates(60, seed=4)
    for a, b in itertools.product(texts, repeat=2):
        ref = SCORER.score(target=a, prediction=b)["rougeL"].fmeasure
        ta, tb = rouge_tokens(a), rouge_tokens(b)
        got = rouge_l_f(ta, tb)
        assert got == ref, (a, b, got, ref)
        assert rouge_l_f(tb, ta) == got  # symmetric, bit for bit
    # The empty-token case is 0 (rouge_score returns the int 0).
    assert rouge_l_f([], ["a"]) == 0.0 == SCORER.score("", "a")["rougeL"].fmeasure


def test_bit_parallel_lcs_matches_dp_including_multiword(monkeypatch):
    rng = random.Random(5)
    shard = novelty_index.Shard()
    pool = []
    for g in range(60):
        m = rng.choice([1, 2, 7, 30, 63, 64, 65, 100, 140])
        ids = [rng.randint(1, 6) for _ in range(m)]
        pool.append(ids)
        shard.add(g, ids)
    sel = np.arange(len(pool))
    for n in (1, 5, 40, 63, 64, 65, 127, 128, 129, 200):
        cand = [rng.randint(1, 7) for _ in range(n)]
        cmasks = {}
        for i, t in enumerate(cand):
            cmasks[t] = cmasks.get(t, 0) | (1 << i)
        expected = [rouge_scorer._score_lcs(ids, cand).fmeasure if ids else 0.0 for ids in pool]
        for ids in pool:
            assert rouge.lcs_len(ids, cand) == _dp_lcs(ids, cand)
        got_np = [f for f, _ in shard._score_np(sel, cand, cmasks)]
        got_py = [f for f, _ in shard._score_py(sel, cand, cmasks)]
        assert got_np == expected, n
        assert got_py == expected, n
        with monkeypatch.context() as mp:
            mp.setattr(novelty_index, "_NP_CHUNK", 300)  # several chunks
            assert [f for f, _ in shard._score_np(sel, cand, cmasks)] == expected, n


# --------------------------------------------------------------------------- #
# Filter equivalence with the naive loop.
# --------------------------------------------------------------------------- #


def _check_same(got: list[NoveltyDecision], ref: list[NoveltyDecision]) -> None:
    assert len(got) == len(ref)
    assert [d.kept for d in got] == [d.kept for d in ref]
    assert [d.best_score for d in got] == [d.best_score for d in ref]
    assert [d.nearest_index for d in got] == [d.nearest_index for d in ref]


def test_equivalence_threshold_05():
    cands = make_candidates(1200, seed=1)
    ref = naive_filter(cands, threshold=0.5)
    filt = NoveltyFilter(threshold=0.5)
    got = filt.filter(cands)
    _check_same(got, ref)
    kept = sum(d.kept for d in ref)
    assert 50 < kept < 1400  # many near-duplicates rejected, not everything
    assert filt.pool_size == kept


def test_equivalence_threshold_07_with_existing_and_several_calls():
    existing = make_candidates(60, seed=7)
    cands = make_candidates(700, seed=2)
    ref = naive_filter(cands, existing=existing, threshold=0.7)
    filt = NoveltyFilter()
    filt.add_existing(existing)
    assert filt.pool_size == len(existing)
    got = filt.filter(cands[:300]) + filt.filter(cands[300:])  # state carries over
    _check_same(got, ref)
    assert filt.pool_size == len(existing) + sum(d.kept for d in ref)
    assert any(d.nearest_index is not None and d.nearest_index < 60 for d in got)


def test_vectorised_path_used_and_exact(monkeypatch):
    # Many pool prompts with the same bag of words: the bag bound cannot prune
    # them, so the exact LCS runs vectorised (including > 64-token candidates).
    rng = random.Random(11)
    base = "we should share water food and land with our neighbors and children".split()
    long_base = base * 6
    existing = []
    for _ in range(80):
        w = list(base)
        rng.shuffle(w)
        existing.append(" ".join(w))
    cands = []
    for _ in range(25):
        w = list(long_base if rng.random() < 0.3 else base)
        for _ in range(rng.randint(0, len(w))):
            i, j = rng.randrange(len(w)), rng.randrange(len(w))
            w[i], w[j] = w[j], w[i]
        cands.append(" ".join(w))
    calls = []
    orig = novelty_index.Shard._score_np

    def spy(self, sel, cand, cmasks):
        calls.append((len(sel), len(cand)))
        return orig(self, sel, cand, cmasks)

    monkeypatch.setattr(novelty_index.Shard, "_score_np", spy)
    for thr in (0.5, 0.9):
        calls.clear()
        ref = naive_filter(cands, existing=existing, threshold=thr)
        filt = NoveltyFilter(threshold=thr)
        filt.add_existing(existing)
        _check_same(filt.filter(cands), ref)
        assert calls and any(n > 64 for _, n in calls)


def test_num_workers_2_identical_to_single_process():
    existing = make_candidates(150, seed=8)
    cands = make_candidates(1200, seed=9)
    single = NoveltyFilter(threshold=0.6)
    single.add_existing(existing)
    ref = single.filter(cands)
    with NoveltyFilter(threshold=0.6, num_workers=2, backend="process", block_size=128) as par:
        par.add_existing(existing)
        got = par.filter(cands[:700])
        par.close()  # workers restart and are re-seeded with the pool
        got += par.filter(cands[700:])
        assert par.pool_size == single.pool_size
        _check_same(got, ref)
        # Ties inside one block: the first kept prompt of the block wins.
        ties = ["alpha beta", "gamma delta", "alpha beta gamma delta", "gamma delta alpha beta"]
        first = par.pool_size
        got = par.filter(ties)
    assert got == single.filter(ties)
    assert [d.kept for d in got] == [True, True, False, False]
    f = rouge_l_f(["alpha", "beta"], ["gamma", "delta", "alpha", "beta"])
    assert f == 2 / 3 and f == rouge_l_f(["gamma", "delta"], ["gamma", "delta", "alpha", "beta"])
    assert [(d.best_score, d.nearest_index) for d in got[2:]] == [(f, first), (f, first)]


@pytest.mark.slow
def test_ray_backend_identical(ray_local):
    cands = make_candidates(600, seed=12)
    ref = NoveltyFilter().filter(cands)
    with NoveltyFilter(num_workers=2, block_size=100) as par:  # backend="auto" -> Ray
        got = par.filter(cands)
        assert isinstance(par._workers, novelty_workers.RayBackend)
    _check_same(got, ref)


# --------------------------------------------------------------------------- #
# Threshold boundary, semantics, validation.
# --------------------------------------------------------------------------- #


def test_threshold_boundary_exact_score_rejects():
    # LCS 2 of 4 vs 4 tokens: p = r = 0.5, F = 0.5 exactly.
    assert SCORER.score("a b c d", "a b x y")["rougeL"].fmeasure == 0.5
    for thr, kept in ((0.5, False), (math.nextafter(0.5, 1.0), True)):
        filt = NoveltyFilter(threshold=thr)
        filt.add_existing(["a b c d"])
        (d,) = filt.filter(["A, b; X y"])
        assert d == NoveltyDecision(kept, 0.5, 0)
        assert naive_filter(["A, b; X y"], existing=["a b c d"], threshold=thr) == [d]

    # Pairs whose exact rational F is the threshold; the float may land on
    # either side of it, and the decision must follow rouge_score's float.
    words = [f"w{i}" for i in range(40)]
    seen = set()
    for thr in (0.5, 0.6, 0.7, 0.75, 0.8, 0.9):
        for m in range(1, 30):
            for n in range(1, 30):
                lcs = thr * (m + n) / 2
                if abs(lcs - round(lcs)) > 1e-9 or not 0 < round(lcs) <= min(m, n):
                    continue
                lcs = round(lcs)
                target = " ".join(words[:m])
                pred = " ".join(words[:lcs] + [f"x{i}" for i in range(n - lcs)])
                f = SCORER.score(target, pred)["rougeL"].fmeasure
                seen.add(f == thr)
                filt = NoveltyFilter(threshold=thr)
                filt.add_existing([target])
                (d,) = filt.filter([pred])
                assert d.best_score == f and d.kept == (f < thr), (thr, m, n, lcs, f)
                assert d.kept == naive_filter([pred], [target], thr)[0].kept
    assert seen == {True, False}  # both exact hits and float round-off occur


def test_semantics_empty_duplicates_and_indices():
    filt = NoveltyFilter(threshold=0.7)
    assert filt.pool_size == 0
    got = filt.filter(["", "Hello world!", "hello, WORLD", "社区", "completely different words"])
    assert got == [
        NoveltyDecision(True, 0.0, None),  # empty pool: kept
        NoveltyDecision(True, 0.0, None),  # nothing shared with "": kept
        NoveltyDecision(False, 1.0, 1),  # same tokens as pool[1]
        NoveltyDecision(True, 0.0, None),  # no tokens at all: kept
        NoveltyDecision(True, 0.0, None),
    ]
    assert filt.pool_size == 4
    # Ties go to the first pool prompt with the best score (argmax), also
    # against prompts kept earlier in the same call.
    existing = ["alpha beta", "gamma delta"]
    cands = ["epsilon zeta", "alpha beta gamma delta epsilon zeta"]
    filt = NoveltyFilter(threshold=0.9)
    filt.add_existing(existing)
    got = filt.filter(cands)
    assert got[1].nearest_index == 0 and got[1].best_score == 0.5
    assert got == naive_filter(cands, existing, threshold=0.9)
    filt = NoveltyFilter(threshold=0.9)
    filt.add_existing(existing[::-1])
    assert filt.filter(cands)[1].nearest_index == 0


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0000001, 2, float("nan"), float("inf")])
def test_threshold_validation(bad):
    with pytest.raises(ValueError, match=r"threshold=.*0 < threshold <= 1"):
        NoveltyFilter(threshold=bad)


def test_other_validation():
    NoveltyFilter(threshold=1.0)
    with pytest.raises(ValueError, match="num_workers"):
        NoveltyFilter(num_workers=0)
    with pytest.raises(ValueError, match="backend"):
        NoveltyFilter(backend="threads")
