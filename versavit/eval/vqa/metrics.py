"""VQA answer scoring: a multiple-choice (MCQ) question by the option its prediction names, an open one by exact
match after the VQA evaluation's normalisation; and the blind-guess chance level.

Open questions. The normalisation is the official VQA evaluation's (GT-Vision-Lab/VQA, vqaEval.py
`processPunctuation` and `processDigitArticle`), as VLMEvalKit applies it to its VQA datasets (vlmeval/dataset/
utils/vqa_eval.py `process_answer`: newlines and tabs to spaces, strip, punctuation, then number words to digits
and articles dropped, lower case). The contraction table of `processDigitArticle` (e.g. "dont" -> "don't") is left
out: it only restores apostrophes in English contractions, which no answer of the synthetic world has. A question
scores 1 when the prediction matches its answer or any of its alternatives (OCRBench's answer lists, MM-Vet's
"<OR>"), else 0 (VLMEvalKit's `method="accuracy"` path after normalisation), not VQAv2's min(#matches / 3, 1) over
ten human answers.

MCQ questions ({letter: option text}). The normalisation above would turn the letter "A" into "" (an article), so
the prediction is matched to an option as VLMEvalKit's exact-matching MCQ evaluation does (vlmeval/utils/
matching_util.py `can_infer` = `can_infer_option`, else `can_infer_text`): `infer_option` takes the one option
letter standing alone among the prediction's words once the marks .()[],:;!*#{} are spaces ("B", "B.", "(B) red",
"The answer is B"; two letters: none), else the one option whose text (lower case) the prediction contains, when
the prediction is at most twice as long as all option texts together; the question scores 1 when that is its
answer's letter.
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


_OPTION_MARKS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})  # can_infer_option's `chars`


def _options(options: Mapping[str, str | None] | None) -> dict[str, str]:
    """The options that are there (a JSON round trip may give absent ones as None)."""
    return {str(k): str(v) for k, v in (options or {}).items() if v is not None}


def option_from_letter(prediction: str, options: Mapping[str, str]) -> str | None:
    """VLMEvalKit's can_infer_option: the option letter that stands alone among the prediction's words (marks
    .()[],:;!*#{} read as spaces), when exactly one of the options' letters does; None otherwise."""
    words = str(prediction).translate(_OPTION_MARKS).split()
    found = [k for k in options if k in words]
    return found[0] if len(found) == 1 else None


def option_from_text(prediction: str, options: Mapping[str, str]) -> str | None:
    """VLMEvalKit's can_infer_text: the option whose text (lower case) the prediction contains, when exactly one
    does and the prediction is at most twice as long as the option texts together; None otherwise."""
    text = str(prediction).lower()
    if len(text) > 2 * sum(len(v) for v in options.values()):
        return None
    found = [k for k, v in options.items() if v.lower() in text]
    return found[0] if len(found) == 1 else None


def infer_option(prediction: str, options: Mapping[str, str | None]) -> str | None:
    """The option letter a prediction names (VLMEvalKit's can_infer: by letter, else by the option's text)."""
    present = _options(options)
    return option_from_letter(prediction, present) or option_from_text(prediction, present)


def score(prediction: str, answer: str, options: Mapping[str, str | None] | None = None,
          alternatives: Sequence[str] = ()) -> float:
    """1.0 when the prediction answers the question, else 0.0: an MCQ question (`options`) by the option letter
    the prediction names (its answer is the letter), an open one by exact match with the answer or any of
    `alternatives` (when given, they are the answers that count)."""
    if _options(options):
        return float(infer_option(prediction, options or {}) == str(answer).strip())
    return max((exact_match(prediction, a) for a in (alternatives or [answer])), default=0.0)


def scores(predictions: Sequence[str], answers: Sequence[str],
           options: Sequence[Mapping[str, str | None] | None] | None = None,
           alternatives: Sequence[Sequence[str]] | None = None) -> list[float]:
    """`score` of every question (options and alternatives per question; None: open questions, one answer)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    opts = list(options) if options is not None else [None] * len(answers)
    alts = list(alternatives) if alternatives is not None else [()] * len(answers)
    return [score(p, a, o, s) for p, a, o, s in zip(predictions, answers, opts, alts, strict=True)]


def accuracy(predictions: Sequence[str], answers: Sequence[str],
             options: Sequence[Mapping[str, str | None] | None] | None = None,
             alternatives: Sequence[Sequence[str]] | None = None) -> float:
    """Mean score (a fraction; 0 for no questions): exact match, or the option named for MCQ questions."""
    hits = scores(predictions, answers, options, alternatives)
    return sum(hits) / len(hits) if hits else 0.0


def mean_by_category(values: Sequence[float], categories: Sequence[str]) -> dict[str, float]:
    """Mean of per-question values per category."""
    groups: dict[str, list[float]] = defaultdict(list)
    for value, cat in zip(values, categories, strict=True):
        groups[cat].append(value)
    return {cat: sum(v) / len(v) for cat, v in sorted(groups.items())}


def accuracy_by_category(predictions: Sequence[str], answers: Sequence[str], categories: Sequence[str],
                         options: Sequence[Mapping[str, str | None] | None] | None = None,
                         alternatives: Sequence[Sequence[str]] | None = None) -> dict[str, float]:
    """Mean score per category (the synthetic world's question kinds: count, color, shape, spatial; a
    benchmark's categories)."""
    return mean_by_category(scores(predictions, answers, options, alternatives), categories)


class AnswerPrior:
    """The blind guess: per category, the most frequent (normalised) training answer. Its accuracy on the
    evaluation questions is the chance level a model that does not look at the image can reach by knowing the
    question's kind (a colour question gets the commonest colour, a yes/no question the commoner of the two); on
    an MCQ question, picking an option at random (1 / its number of options)."""

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

    def chance(self, answer: str, category: str, options: Mapping[str, str | None] | None = None,
               alternatives: Sequence[str] = ()) -> float:
        """The blind guess's expected score on one question."""
        present = _options(options)
        if present:
            return 1.0 / len(present)
        return score(self.guess(category), answer, None, alternatives)

    def accuracy(self, answers: Sequence[str], categories: Sequence[str],
                 options: Sequence[Mapping[str, str | None] | None] | None = None,
                 alternatives: Sequence[Sequence[str]] | None = None) -> float:
        opts = list(options) if options is not None else [None] * len(answers)
        alts = list(alternatives) if alternatives is not None else [()] * len(answers)
        values = [self.chance(a, c, o, s) for a, c, o, s in zip(answers, categories, opts, alts, strict=True)]
        return sum(values) / len(values) if values else 0.0

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {cat: dict(c.most_common()) for cat, c in sorted(self.counts.items())}

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, int]]) -> AnswerPrior:
        prior = cls()
        for cat, counts in data.items():
            prior.counts[cat].update(dict(counts))
        return prior


__all__ = ["AnswerPrior", "accuracy", "accuracy_by_category", "exact_match", "infer_option", "mean_by_category",
           "normalize_answer", "option_from_letter", "option_from_text", "score", "scores"]
