"""VQA answer scoring: exact match after the VQA evaluation's normalisation, and the blind-guess chance level.

The normalisation is the official VQA evaluation's (GT-Vision-Lab/VQA, vqaEval.py `processPunctuation` and
`processDigitArticle`), as VLMEvalKit applies it to its VQA datasets (vlmeval/dataset/utils/vqa_eval.py
`process_answer`: newlines and tabs to spaces, strip, punctuation, then number words to digits and articles
dropped, lower case). The contraction table of `processDigitArticle` (e.g. "dont" -> "don't") is left out: it only
restores apostrophes in English contractions, which no answer of the synthetic world has. One reference answer per
question (the synthetic world's), so the score of a question is 1 on a match, else 0 (VLMEvalKit's
`method="accuracy"` path after normalisation), not VQAv2's min(#matches / 3, 1) over ten human answers.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

# vqaEval.py: self.punct, commaStrip, periodStrip, manualMap, articles
_PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: vqaEval.py's pattern (a period not followed by a digit)
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        # vqaEval.py: a mark next to a space (or any "digit,digit") is deleted, one inside a word becomes a space
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def normalize_answer(text: str) -> str:
    """An answer as the VQA evaluation compares it: 'The Red.' -> 'red', 'Two' -> '2', 'a blue cube' -> 'blue cube'."""
    text = str(text).replace("\n", " ").replace("\t", " ").strip()
    words = [_NUMBERS.get(w, w) for w in _punctuation(text).lower().split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the normalised prediction equals the normalised answer, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Mean exact match (a fraction; 0 for no questions)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    return sum(map(exact_match, predictions, answers)) / len(answers) if answers else 0.0


def accuracy_by_category(predictions: Sequence[str], answers: Sequence[str],
                         categories: Sequence[str]) -> dict[str, float]:
    """Mean exact match per category (the synthetic world's question kinds: count, color, shape, spatial)."""
    hits: dict[str, list[float]] = defaultdict(list)
    for pred, ans, cat in zip(predictions, answers, categories, strict=True):
        hits[cat].append(exact_match(pred, ans))
    return {cat: sum(v) / len(v) for cat, v in sorted(hits.items())}


class AnswerPrior:
    """The blind guess: per category, the most frequent (normalised) training answer. Its accuracy on the
    evaluation questions is the chance level a model that does not look at the image can reach by knowing the
    question's kind (a colour question gets the commonest colour, a yes/no question the commoner of the two)."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter[str]] = defaultdict(Counter)

    def update(self, answers: Iterable[str], categories: Iterable[str]) -> None:
        for ans, cat in zip(answers, categories, strict=True):
            self.counts[cat][normalize_answer(ans)] += 1

    def guess(self, category: str) -> str:
        """The commonest training answer of `category` (ties: the alphabetically first); '' if never seen."""
        counts = self.counts.get(category)
        if not counts:
            return ""
        top = max(counts.values())
        return min(a for a, c in counts.items() if c == top)

    def accuracy(self, answers: Sequence[str], categories: Sequence[str]) -> float:
        return accuracy([self.guess(c) for c in categories], answers)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {cat: dict(c.most_common()) for cat, c in sorted(self.counts.items())}

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, int]]) -> AnswerPrior:
        prior = cls()
        for cat, counts in data.items():
            prior.counts[cat].update(dict(counts))
        return prior


__all__ = ["AnswerPrior", "accuracy", "accuracy_by_category", "exact_match", "normalize_answer"]
