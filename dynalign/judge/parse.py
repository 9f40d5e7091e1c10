"""Reading scores and pairwise verdicts: only the judge's own output, only its final answer (a
reasoning part is skipped)."""

from __future__ import annotations

import re

_THINK_OPEN = re.compile(r"<(think|thinking|reasoning)>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</(think|thinking|reasoning)>", re.IGNORECASE)
_NUMBER = r"\**\s*(-?\d+(?:\.\d+)?)(?![.\d]*\d)(?:\s*/\s*(\d+))?"


def final_answer(text: str | None) -> str | None:
    """The judge's answer without its reasoning part: the text after the last '</think>'; None when
    the reasoning never closed (the answer was cut off) or there is no text."""
    if text is None:
        return None
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        return text[closes[-1].end():]
    if _THINK_OPEN.search(text):
        return None
    return text


def _label_body(pillar: str | None) -> str:
    if pillar is None:
        return r"score\**\s*:"
    return r"score\s*\(\s*" + r"\s+".join(map(re.escape, pillar.split())) + r"\s*\)\**\s*:"


def _label_pattern(pillar: str | None) -> str:
    return r"(?<![\w(])" + _label_body(pillar)


def _in_range(match: re.Match, number_group: int, lo: int, hi: int) -> float | None:
    value = float(match.group(number_group))
    denominator = match.group(number_group + 1)
    if denominator is not None and int(denominator) != hi:
        return None  # 'Score: 8/10' on a 0-5 scale is not a score on this scale
    return value if lo <= value <= hi else None


def parse_score(judge_output: str | None, score_min: int, score_max: int, pillar: str | None = None) -> float | None:
    """The judge's final well-formed, in-range 'Score: N' (or 'Score (Pillar): N'), or None.

    Give it the judge's output only (never the prompt): a candidate's text can then not change
    the result. A reasoning part (``<think>...</think>``) is skipped."""
    answer = final_answer(judge_output)
    if answer is None:
        return None
    pattern = re.compile(_label_pattern(pillar) + r"\s*" + _NUMBER, re.IGNORECASE)
    for match in reversed(list(pattern.finditer(answer))):
        value = _in_range(match, 1, score_min, score_max)
        if value is not None:
            return value
    return None


def parse_group_scores(judge_output: str | None, count: int, score_min: int, score_max: int,
                       pillar: str | None = None) -> list[float | None]:
    """Per shown position 1..count, the final well-formed in-range 'Candidate K: Score: N'."""
    scores: list[float | None] = [None] * count
    answer = final_answer(judge_output)
    if answer is None:
        return scores
    pattern = re.compile(r"candidate\s*#?\s*(\d+)\s*\**\s*[:.)\-\u2013]?\s*\**\s*" + _label_body(pillar)
                         + r"\s*" + _NUMBER, re.IGNORECASE)
    for match in pattern.finditer(answer):
        position = int(match.group(1))
        value = _in_range(match, 2, score_min, score_max)
        if 1 <= position <= count and value is not None:
            scores[position - 1] = value
    return scores


_VERDICT = re.compile(r"winner\W{0,6}(?:is\W{0,3})?(?:answer\W{0,3})?(1|2|tie|none|neither|both)\b", re.IGNORECASE)


def parse_verdict(text: str | None) -> float | None:
    """The judge's last 'Winner: 1|2|tie' as its preference for answer 1 (1, 0, 0.5), or None.

    Tolerant of markdown and wording ('**Winner:** Answer 2', 'winner - tie', 'Winner: neither');
    a reasoning part (``<think>...</think>``) is skipped, as for scores."""
    answer = final_answer(text)
    matches = _VERDICT.findall(answer) if answer else []
    if not matches:
        return None
    last = matches[-1].lower()
    return 1.0 if last == "1" else 0.0 if last == "2" else 0.5


def message_text(message) -> str:
    """An OpenAI-style chat message's final answer (a dict or the client's message object):
    ``content`` only. A separate reasoning part (``reasoning_content`` or ``reasoning``) is never parsed."""
    content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
    return content or ""
