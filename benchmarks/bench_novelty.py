"""Benchmark: NoveltyFilter vs the naive rouge_score loop on synthetic prompts.

    python -m benchmarks.bench_novelty [--n 5000] [--repeats 3] [--workers 1] [--json OUT]

Builds ``n`` seeded, realistic-ish self-generated prompts (template questions
about values and communities, 10-60 words, a realistic share of them
near-duplicates of earlier ones: word drops/swaps/insertions/synonyms,
re-casing, punctuation), times the naive loop once (slow; tqdm progress) and
the fast filter ``repeats`` times, checks that the decisions are identical and
reports the speed-up (target >= 50x).  ``run()`` is importable by a suite runner.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from dynalign.novelty import NoveltyFilter, naive_filter

TARGET_SPEEDUP = 50

_OPENERS = [
    "How should",
    "In what ways can",
    "Why might",
    "What would it mean for",
    "Describe how",
    "Explain why",
    "Consider a situation in which",
    "Imagine that",
    "Discuss whether",
    "What is the best way for",
]
_GROUPS = [
    "a small fishing village",
    "an online gaming community",
    "a neighbourhood association",
    "a rural farming cooperative",
    "a group of university students",
    "a remote mountain town",
    "a multinational software team",
    "a local public library",
    "a volunteer fire brigade",
    "an immigrant community in a large city",
    "a family running a restaurant",
    "a hospital ethics committee",
    "a religious congregation",
    "a youth football club",
    "a housing cooperative",
]
_VERBS = [
    "balance",
    "weigh",
    "prioritise",
    "protect",
    "reconcile",
    "talk about",
    "teach",
    "uphold",
    "rethink",
    "decide between",
]
_VALUES = [
    "honesty and loyalty",
    "individual freedom and collective responsibility",
    "fairness and compassion",
    "tradition and innovation",
    "privacy and transparency",
    "justice and mercy",
    "self-reliance and mutual aid",
    "respect for elders and the voices of young people",
    "economic growth and care for the environment",
    "free speech and protection from harm",
    "equality and merit",
    "trust and accountability",
]
_SITUATIONS = [
    "when resources are scarce",
    "after a long drought destroys most of the harvest",
    "when a trusted member is accused of stealing",
    "during a disputed local election",
    "when newcomers arrive with different customs",
    "after a factory closes and many people lose their jobs",
    "when a new technology changes how people work",
    "while recovering from a flood",
    "when a popular leader breaks a promise",
    "when two families are in a bitter dispute over land",
    "as the population grows older",
    "when a scandal is reported in the news",
]
_FOLLOWUPS = [
    "Give concrete examples.",
    "Explain the trade-offs involved and who bears the costs.",
    "Consider the perspectives of at least three different people affected by the decision.",
    "What principles should guide them, and how would you justify those principles to someone who disagrees?",
    "Discuss both short-term and long-term consequences for the community.",
    "Answer in a few paragraphs.",
    "How might their answer differ from that of a community with a different history?",
    "What role should laws, customs and personal conscience each play?",
    "Be specific about the mistakes they should avoid.",
    "Suggest a practical plan they could start next week, and explain how they would know whether it is working.",
]
_ASPECTS = [
    "",
    "",
    "especially for the people with the least power",
    "taking into account the history of earlier conflicts",
    "if the decision must be made within a single day",
    "given that some members strongly distrust outsiders",
    "without relying on any outside authority",
    "while keeping everyone informed",
    "knowing that any mistake will be remembered for generations",
    "if most members disagree with the leadership",
    "with very limited money",
    "when children are directly affected",
    "in a culture that values harmony above open debate",
    "when social media spreads rumours quickly",
    "if the law and local custom point in opposite directions",
]
_SYNONYMS = {
    "should": "ought to",
    "community": "group",
    "people": "members",
    "best": "wisest",
    "explain": "describe",
    "balance": "weigh",
    "different": "distinct",
    "new": "novel",
    "long": "lengthy",
    "small": "tiny",
    "important": "essential",
}
_FILLER = "really also often truly perhaps carefully still very just new local".split()


def _fresh(rng: random.Random) -> str:
    text = (
        f"{rng.choice(_OPENERS)} {rng.choice(_GROUPS)} {rng.choice(_VERBS)} "
        f"{rng.choice(_VALUES)} {rng.choice(_SITUATIONS)}"
    )
    aspect = rng.choice(_ASPECTS)
    text += f", {aspect}?" if aspect else "?"
    for f in rng.sample(_FOLLOWUPS, rng.choice([0, 0, 1, 1, 2, 3])):
        text += " " + f
    return text


def _mutate(rng: random.Random, text: str) -> str:
    words = text.split()
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        i = rng.randrange(len(words))
        if op < 0.3 and len(words) > 10:
            del words[i]
        elif op < 0.55:
            words.insert(i, rng.choice(_FILLER))
        elif op < 0.75:
            j = min(len(words) - 1, i + 1)
            words[i], words[j] = words[j], words[i]
        else:
            w = words[i].lower().strip("?.,")
            if w in _SYNONYMS:
                words[i] = _SYNONYMS[w]
    text = " ".join(words)
    r = rng.random()
    if r < 0.1:
        text = text.lower()
    elif r < 0.15:
        text = text.upper()
    elif r < 0.3:
        text = text.replace("?", " ?!").replace(",", " ,")
    return text


def _clip(rng: random.Random, text: str) -> str:
    words = text.split()
    if len(words) > 60:
        words = words[:60]
    while len(words) < 10:
        words.append(rng.choice(_FILLER))
    return " ".join(words)


def make_candidates(n: int = 5000, seed: int = 0) -> list[str]:
    """Seeded synthetic prompts, about 40% near-duplicates of an earlier one."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < 0.4:
            text = _mutate(rng, rng.choice(out[-500:]))
        else:
            text = _fresh(rng)
        out.append(_clip(rng, text))
    return out


def run(n: int = 5000, repeats: int = 3, num_workers: int = 1, progress: bool = True) -> dict:
    """Time naive (once) vs fast (``repeats`` times) on ``n`` candidates.

    ``*_s`` are wall-clock seconds; ``*_cpu_s`` are this process's CPU seconds
    (robust on a shared, loaded machine; with ``num_workers > 1`` they exclude
    the workers, so compare wall-clock there).
    """
    cands = make_candidates(n)

    from tqdm import tqdm

    t0, c0 = time.perf_counter(), time.process_time()
    ref = naive_filter(tqdm(cands, desc="naive rougeL loop", disable=not progress))
    naive_s, naive_cpu = time.perf_counter() - t0, time.process_time() - c0

    times, cpus = [], []
    identical = True
    for _ in range(repeats):
        filt = NoveltyFilter(num_workers=num_workers)
        t0, c0 = time.perf_counter(), time.process_time()
        got = filt.filter(cands)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        filt.close()
        identical = identical and got == ref
    if not identical:
        raise AssertionError("NoveltyFilter decisions differ from the naive rouge_score loop")
    med = statistics.median(times)
    cpu_med = statistics.median(cpus)
    return {
        "name": "novelty_filter",
        "n": n,
        "num_workers": num_workers,
        "naive_s": round(naive_s, 3),
        "fast_s_median": round(med, 4),
        "fast_s_min": round(min(times), 4),
        "fast_s_max": round(max(times), 4),
        "speedup": round(naive_s / med, 1),
        "target": TARGET_SPEEDUP,
        "decisions_identical": identical,
        "kept": sum(d.kept for d in ref),
        "naive_cpu_s": round(naive_cpu, 3),
        "fast_cpu_s_median": round(cpu_med, 4),
        "speedup_cpu": round(naive_cpu / cpu_med, 1) if cpu_med > 0 else None,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json", metavar="OUT", default=None)
    args = ap.parse_args(argv)
    res = run(args.n, args.repeats, args.workers)
    print(json.dumps(res, indent=2))
    ok = res["speedup"] >= TARGET_SPEEDUP
    print(
        f"speed-up {res['speedup']}x (target >= {TARGET_SPEEDUP}x): {'OK' if ok else 'BELOW TARGET'}"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return res


if __name__ == "__main__":
    main()
