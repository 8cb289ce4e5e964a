"""The VQA benchmarks of the paper's Table 2 (the OpenCompass suite) as VLMEvalKit distributes them: one TSV per
benchmark, images inline. The eight `versavit data prepare` sources (mmbench, mmstar, mmmu, mathvista,
hallusionbench, ai2d, ocrbench, mmvet), the TSV parser the published-layout reader (versavit.eval.datasets.
vlmevalkit) shares, and tiny stand-ins.

The layout: VLMEvalKit's data folder (`$LMUData`, by default ~/LMUData), where it downloads each benchmark's TSV
(vlmeval/dataset/image_base.py `prepare_tsv`; the URLs are the datasets' `DATASET_URL`, e.g.
https://opencompass.openxlab.space/utils/VLMEval/MMStar.tsv):

    <root>/MMBench_DEV_EN_V11.tsv  MMStar.tsv  MMMU_DEV_VAL.tsv  MathVista_MINI.tsv  HallusionBench.tsv
    <root>/AI2D_TEST.tsv  OCRBench.tsv  MMVet.tsv

A TSV (VLMEvalKit docs/en/Development.md, "Implement a new benchmark"): one row per question with `index`, `image`
(a base64-encoded image; or the `index` of another row that holds it, a value of at most 64 characters; or a
Python list literal of base64 images, MMMU's multi-image questions; or no `image` column and `image_path`),
`question`, `answer`, optional `hint`, option columns `A`, `B`, ... for multiple-choice (MCQ) questions,
`category`, `l2-category`, `split`. What is taken from it, as VLMEvalKit reads it:

- images: ImageBaseDataset.__init__ (a short `image` is another row's index; rows without an image are dropped;
  `toliststr` turns a "[...]" literal into a list). Only the first image of a multi-image row is kept (counted as
  multi_image: the MLLM takes one image).
- the prompt: ImageMCQDataset.build_prompt for the MCQ datasets (MMBench, MMStar, MMMU, AI2D): "Hint: <hint>\\n"
  when there is a hint, "Question: <question>\\n", then for a row with options "Options:\\n", one "<letter>.
  <text>\\n" per option column that is not empty (pandas' NA strings count as empty, as `pd.isna` drops them), and
  "Please select the correct answer from the options above. \\n". The other datasets' prompt is the question as
  is (ImageBaseDataset.build_prompt); MathVista's multiple-choice rows carry their choices in the question text
  and as a list literal in `choices` (`question_type` multi_choice; vlmeval/dataset/utils/mathvista.py
  `list_to_dict`: A, B, ... in order), which become the row's options, the correct one the choice equal to the
  answer (or `answer_option`).
- answers: an MCQ row's answer is its option letter; an answer written as a Python list literal (OCRBench:
  "['foo', 'bar']", read by `eval` in VLMEvalKit's OCRBench scoring) or with MM-Vet's "<OR>" lists alternatives,
  any one of which counts (kept as `answers`).
- kept rows: every row, except MMMU's "dev" rows (MMMU_DEV_VAL.tsv holds the 150-question dev split and the
  900-question validation split; OpenCompass reports the validation split).

A sample's question, as the reader's target and the prepared json's `qa` (one question per row): {"question": the
prompt, "answer": the TSV's answer (an MCQ row's: its letter), "kind": `category` or "vqa", "options": {letter:
text} (MCQ rows), "answers": [...] (alternatives, when the answer lists them)}. A prepared sample: the first image
as published (base64-decoded; JPEG and PNG pass through, anything else becomes PNG) and json {benchmark, split,
file, index, key, size [h, w], images (how many the row had), qa: [that question]}. A row whose question or
answer is missing, or whose MCQ answer is not one of its options, is skipped and counted (bad_record); an image
that is not valid base64 or does not decode likewise (bad_image), a missing one or a reference to no row
(missing_image). A TSV without the required columns is one error of the whole benchmark.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from versavit import storage
from versavit.data import codecs
from versavit.data.convert.common import safe_key
from versavit.data.prepare.base import Source

# versavit.data.prepare imports benchmarks before this module, so these helpers exist by the time this runs
from versavit.data.prepare.benchmarks import _read, _Skip, image_field

SPLITS = ("test",)  # the whole TSV VLMEvalKit evaluates (MMBench: its dev split; MathVista: testmini; ...)
REQUIRED = ("index", "question", "answer")
IMAGE_COLUMNS = ("image", "image_path")  # one of them
IMAGE_REFERENCE_MAX = 64  # ImageBaseDataset: an `image` value this short is the index of the row holding it
OPTION_LETTERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
MCQ_INSTRUCTION = "Please select the correct answer from the options above. \n"
OR_SEPARATOR = "<OR>"  # MM-Vet's alternative answers
# pandas.read_csv's default NA strings: VLMEvalKit reads a TSV with pandas, so an option or hint cell holding one
# of these is NaN there and left out of the prompt
NA_STRINGS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                        "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # an inline base64 image is one field of megabytes


@dataclass(frozen=True)
class Spec:
    """One VLMEvalKit benchmark: its TSV, how VLMEvalKit builds its prompts, what its stand-in looks like."""

    name: str  # benchmark and prepare-source name
    file: str  # the TSV's file name in LMUData (VLMEvalKit's dataset name + .tsv)
    title: str
    prompt: str  # "mcq": ImageMCQDataset.build_prompt; "plain": the question as is
    style: str  # the stand-in's questions: mcq, open, yorn (yes/no), mixed (MathVista)
    keep_split: str | None = None  # only rows of this `split` value (MMMU: validation)
    image_format: str = "jpg"  # the stand-in's base64 images


SPECS: dict[str, Spec] = {s.name: s for s in (
    Spec("mmbench", "MMBench_DEV_EN_V11.tsv", "MMBench v1.1 dev (English)", "mcq", "mcq"),
    Spec("mmstar", "MMStar.tsv", "MMStar", "mcq", "mcq"),
    Spec("mmmu", "MMMU_DEV_VAL.tsv", "MMMU validation", "mcq", "mcq", keep_split="validation"),
    Spec("mathvista", "MathVista_MINI.tsv", "MathVista testmini", "plain", "mixed"),
    Spec("hallusionbench", "HallusionBench.tsv", "HallusionBench", "plain", "yorn"),
    Spec("ai2d", "AI2D_TEST.tsv", "AI2D test", "mcq", "mcq"),
    Spec("ocrbench", "OCRBench.tsv", "OCRBench", "plain", "open", image_format="png"),
    Spec("mmvet", "MMVet.tsv", "MM-Vet", "plain", "open"),
)}
NAMES: tuple[str, ...] = tuple(SPECS)


def spec_of(name: str) -> Spec:
    if name not in SPECS:
        raise ValueError(f"unknown VLMEvalKit benchmark {name!r}; expected one of {list(SPECS)}")
    return SPECS[name]


# ------------------------------------------------------------------------------------------ the TSV


def tsv_url(root: str, name: str) -> str:
    """The URL of benchmark `name`'s TSV under `root` (VLMEvalKit's LMUData folder)."""
    spec = spec_of(name)
    url = storage.join(root.rstrip("/"), spec.file)
    if not storage.exists(url):
        raise storage.StorageError(f"{name}: no {spec.file} under {root}; put VLMEvalKit's {spec.file} there (the "
                                   f"file VLMEvalKit downloads into $LMUData, e.g. https://opencompass.openxlab.space/"
                                   f"utils/VLMEval/{spec.file})", kind="missing")
    return url


def check_columns(header: Sequence[str], where: str) -> None:
    """ValueError naming the missing columns when `header` lacks what a VLMEvalKit benchmark TSV must have."""
    missing = [c for c in REQUIRED if c not in header]
    if not any(c in header for c in IMAGE_COLUMNS):
        missing.append(" or ".join(IMAGE_COLUMNS))
    if missing:
        raise ValueError(f"{where}: not a VLMEvalKit benchmark TSV: no column(s) {', '.join(missing)} (columns: "
                         f"{', '.join(list(header)[:12]) or 'none'}); re-download the dataset's TSV as VLMEvalKit "
                         "distributes it (tab-separated, a header row with index, image, question, answer, ...)")


def iter_tsv(lines: Iterable[str], where: str) -> Iterator[dict[str, str]]:
    """The rows of a VLMEvalKit TSV (text lines) as {column: cell}, the header checked first. Read as pandas'
    read_csv(sep='\\t') reads it: tab-separated, fields optionally double-quoted (quotes doubled inside)."""
    reader = csv.reader(lines, delimiter="\t")
    header = next(reader, None)
    if header is None:
        raise ValueError(f"{where}: empty file; re-download the dataset's TSV")
    header = [h.strip() for h in header]
    check_columns(header, where)
    for cells in reader:
        if not cells:
            continue
        yield {h: (cells[i] if i < len(cells) else "") for i, h in enumerate(header)}


def open_tsv(url: str) -> Iterator[dict[str, str]]:
    """Stream the rows of the TSV at `url` (local or s3://)."""
    with storage.open_url(url, "rb") as raw:
        yield from iter_tsv(io.TextIOWrapper(raw, encoding="utf-8", newline=""), url)


def _present(value: str | None) -> bool:
    """Whether a cell holds a value (VLMEvalKit: not pd.isna after pandas' NA parsing)."""
    return value is not None and value.strip() not in NA_STRINGS


def _literal_list(text: str) -> list[Any] | None:
    """A "[...]" Python list literal's items (VLMEvalKit evaluates these), else None."""
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return value if isinstance(value, list) else None


def build_prompt(question: str, options: Mapping[str, str], hint: str | None, style: str) -> str:
    """The text VLMEvalKit asks: ImageMCQDataset.build_prompt for style "mcq", the question as is for "plain"."""
    if style != "mcq":
        return question
    prompt = f"Hint: {hint}\n" if hint is not None else ""
    prompt += f"Question: {question}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items()) + MCQ_INSTRUCTION
    return prompt


def answer_alternatives(answer: str) -> list[str]:
    """The alternatives an answer lists (a list literal, or MM-Vet's "a<OR>b"); [] for a single answer."""
    items = _literal_list(answer)
    if items is not None:
        return [str(a) for a in items]
    if OR_SEPARATOR in answer:
        return [a.strip() for a in answer.split(OR_SEPARATOR) if a.strip()]
    return []


def row_question(spec: Spec, row: Mapping[str, str]) -> dict[str, Any]:
    """One TSV row -> its question {question, answer, kind, options?, answers?}; ValueError when the row lacks what
    scoring needs (question, answer; an MCQ answer among the options)."""
    question, answer = row.get("question"), row.get("answer")
    if question is None or not question.strip():
        raise ValueError("no question")
    if answer is None or not answer.strip():
        raise ValueError("no answer")
    answer = answer.strip()
    options = {k: row[k] for k in OPTION_LETTERS if k in row and _present(row[k])}
    if not options and row.get("question_type", "").strip() == "multi_choice" and _present(row.get("choices")):
        choices = _literal_list(row["choices"] or "")  # MathVista: the choices as a list, in the question already
        if not choices:
            raise ValueError(f"choices is not a list literal: {str(row.get('choices'))[:80]}")
        options = {OPTION_LETTERS[i]: str(c) for i, c in enumerate(choices[:len(OPTION_LETTERS)])}
        letter = (row.get("answer_option") or "").strip()
        if letter not in options:
            letter = next((k for k, v in options.items() if v == answer), "")
        answer = letter
    hint = row.get("hint") if _present(row.get("hint")) else None
    qa: dict[str, Any] = {"question": build_prompt(question, options, hint, spec.prompt), "answer": answer,
                          "kind": row["category"].strip() if _present(row.get("category")) else "vqa"}
    if options:
        if answer not in options:
            raise ValueError(f"answer {answer!r} is not one of the options {list(options)}")
        qa["options"] = options
    else:
        alternatives = answer_alternatives(answer)
        if alternatives:
            qa["answers"] = alternatives
    return qa


def row_images(row: Mapping[str, str]) -> list[str]:
    """The `image` cell's images (base64 strings, or one row index), a list literal split; [] without one."""
    cell = (row.get("image") or "").strip()
    if not _present(cell):
        return []
    items = _literal_list(cell)
    return [str(x) for x in items] if items is not None else [cell]


def row_image_paths(row: Mapping[str, str]) -> list[str]:
    cell = (row.get("image_path") or "").strip()
    if not _present(cell):
        return []
    items = _literal_list(cell)
    return [str(x) for x in items] if items is not None else [cell]


def is_reference(image: str) -> bool:
    """ImageBaseDataset: an `image` of at most 64 characters is the index of the row holding the image."""
    return len(image) <= IMAGE_REFERENCE_MAX


def decode_base64(image: str) -> bytes:
    """A base64 image -> its bytes (_Skip bad_image when it is not base64)."""
    try:
        return base64.b64decode(image, validate=False)
    except (binascii.Error, ValueError):
        raise _Skip("bad_image") from None


def kept(spec: Spec, row: Mapping[str, str]) -> bool:
    """Whether the row belongs to the evaluated rows (MMMU: its validation split only)."""
    return spec.keep_split is None or (row.get("split") or "").strip() == spec.keep_split


@dataclass
class Question:
    """A kept row as both readers use it: its index, question and first image (base64, resolved, or a path)."""

    index: str
    qa: dict[str, Any]
    image: str = ""  # base64 (a reference already resolved)
    image_path: str = ""  # when the TSV has no `image` column
    images: int = 1  # images the row had


def parse_rows(spec: Spec, rows: Iterable[Mapping[str, str]], counts: Counter,
               wanted: set[str] | None = None) -> tuple[list[Question], set[str]]:
    """The kept rows (only those whose index is in `wanted`, when given) as Questions, rows without their
    question counted (bad_record, missing_image); returns them and the indices of the rows whose image other
    rows refer to (`resolve_references` looks them up)."""
    out: list[Question] = []
    references: set[str] = set()
    for row in rows:
        index = (row.get("index") or "").strip()
        if wanted is not None and index not in wanted:
            continue
        if not kept(spec, row):
            continue
        counts["records"] += 1
        try:
            qa = row_question(spec, row)
        except ValueError:
            counts["bad_record"] += 1
            continue
        images, paths = row_images(row), row_image_paths(row)
        if not images and not paths:
            counts["missing_image"] += 1
            continue
        question = Question(index, qa, images=max(len(images), len(paths)))
        if images:
            question.image = images[0]
            if len(images) == 1 and is_reference(images[0]):
                references.add(images[0])
        else:
            question.image_path = paths[0]
        out.append(question)
    return out, references


def resolve_references(questions: list[Question], references: set[str], rows: Iterable[Mapping[str, str]],
                       counts: Counter) -> list[Question]:
    """Replace each referring question's image by the referenced row's (from `rows`, a pass over the TSV); those
    whose row is not there, or holds no image of its own, are dropped and counted (missing_image)."""
    if not references:
        return questions
    found: dict[str, str] = {}
    for row in rows:
        index = (row.get("index") or "").strip()
        if index in references:
            images = row_images(row)
            if len(images) >= 1 and not is_reference(images[0]):
                found[index] = images[0]
    out = []
    for q in questions:
        if q.image and is_reference(q.image):
            if q.image not in found:
                counts["missing_image"] += 1
                continue
            q.image = found[q.image]
        out.append(q)
    return out


def question_bytes(q: Question, root: str) -> bytes:
    """The question's first image file as stored (base64-decoded, or read from `image_path` under `root`)."""
    if q.image:
        return decode_base64(q.image)
    path = q.image_path
    return _read(path if path.startswith(("/", "s3://")) else storage.join(root.rstrip("/"), path), "missing_image")


def question_image(q: Question, root: str, counts: Counter) -> tuple[str, bytes, tuple[int, int]]:
    """The question's first image as (field name, bytes, (h, w)), decoded once to check it; _Skip with the reason
    when it is unreadable."""
    found = image_field(question_bytes(q, root))
    if q.images > 1:
        counts["multi_image"] += 1  # not corrupt: the MLLM takes one image
    return found


def read_questions(name: str, url: str, counts: Counter, wanted: set[str] | None = None) -> list[Question]:
    """The kept questions of the TSV at `url` (those indexed in `wanted`, when given), references resolved."""
    spec = spec_of(name)
    questions, references = parse_rows(spec, open_tsv(url), counts, wanted)
    return resolve_references(questions, references, open_tsv(url) if references else (), counts)


def target_of(q: Question) -> dict[str, Any]:
    """The reader's target of a question: {key, index, qa: [question]}."""
    return {"key": q.index, "index": q.index, "qa": [dict(q.qa)]}


# ------------------------------------------------------------------------------------------ the sources


def list_vlmevalkit(name: str):  # -> ListUnits
    def list_units(input_url: str, split: str) -> list[Any]:
        """The kept rows' indices, in the TSV's order (a shard's rows are read back by index)."""
        if split not in SPLITS:
            raise ValueError(f"{name} split must be one of {list(SPLITS)}, got {split!r}")
        spec = spec_of(name)
        return [(r.get("index") or "").strip() for r in open_tsv(tsv_url(input_url, name)) if kept(spec, r)]

    return list_units


def read_vlmevalkit(name: str):  # -> ReadUnits
    def read_units(input_url: str, split: str, units: list[Any], counts: Counter) -> Iterator[dict[str, Any]]:
        """Each unit's row: its first image as published + its question (json)."""
        spec = spec_of(name)
        url = tsv_url(input_url, name)
        for q in read_questions(name, url, counts, {str(u) for u in units}):
            try:
                image, data, size = question_image(q, input_url, counts)
            except _Skip as skip:
                counts[skip.reason] += 1
                continue
            counts["samples"] += 1
            yield {"__key__": safe_key(name, q.index), image: data,
                   "json": {"benchmark": name, "split": split, "file": spec.file, **target_of(q),
                            "size": list(size), "images": q.images}}

    return read_units


# ------------------------------------------------------------------------------------------ fixtures

FIXTURE_ROWS = 8  # questions per stand-in (kept rows: MMMU's stand-in also has dev rows, left out)
FIXTURE_SIZE = 64
_DIGITS = tuple(str(i) for i in range(7))
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")


def _distractors(answer: str, kind: str, n: int, rng: Any) -> list[str]:
    from versavit.data.synthetic.scene import COLORS, SHAPES

    pool = {"color": COLORS, "shape": SHAPES}.get(kind, _DIGITS)
    others = [v for v in pool if v != answer]
    return [others[i] for i in rng.permutation(len(others))[:n]]


def _scene_question(scene: Any, kinds: Sequence[str]) -> dict[str, str]:
    """The scene's first question of the first kind in `kinds` it has (every scene has a count question)."""
    for kind in kinds:
        for qa in scene.qa:
            if qa["kind"] == kind:
                return dict(qa)
    return {"question": "How many objects are there?", "answer": str(len(scene.objects)), "kind": "count"}


def fixture_truth(name: str, seed: int) -> list[dict[str, Any]]:
    """The stand-in of benchmark `name`: one dict per TSV row, in order, with "row" (the TSV cells as written),
    "image" (the scene as rendered, before JPEG/PNG), "kept" (whether the reader keeps it) and, for kept rows,
    "target" (what the reader must give back) and "images" (how many the row has). Questions about what the
    scene shows (colour, shape and count of its objects); quirks of the real files: hints on some MCQ rows,
    2-4 options, an image given as another row's index (MMBench), a multi-image row and dev rows (MMMU),
    list-literal answers (OCRBench), "<OR>" answers (MM-Vet), Yes/No answers (HallusionBench), choices in the
    question with a `choices` list (MathVista)."""
    import numpy as np

    from versavit.data.synthetic import render_sample

    spec = spec_of(name)
    rng = np.random.default_rng([seed, NAMES.index(name)])
    truths: list[dict[str, Any]] = []
    n_rows = FIXTURE_ROWS + (2 if name == "mmmu" else 0)
    for i in range(n_rows):
        reference = name == "mmbench" and i == 3  # row 1's image, given by its index: another question about it
        scene = render_sample(seed, "test", 100 * NAMES.index(name) + (1 if reference else i),
                              image_size=FIXTURE_SIZE, min_objects=1, max_objects=3)
        index = str(1000 + 7 * i) if name != "mmvet" else f"v1_{i}"
        row: dict[str, str] = {"index": index}
        truth: dict[str, Any] = {"image": scene.image, "kept": True, "images": 1, "index": index}
        colour_first = i % 2 == 0 or reference
        qa = _scene_question(scene, ("color", "count", "shape") if colour_first else ("count", "shape", "color"))
        if spec.style == "mcq" or (spec.style == "mixed" and i % 2 == 0):
            n_options = 4 if spec.name != "mmbench" else 2 + i % 3
            options = [qa["answer"], *_distractors(qa["answer"], qa["kind"], n_options - 1, rng)]
            n_options = len(options)  # three shapes only: a shape question has three options
            correct = i % n_options
            options[0], options[correct] = options[correct], options[0]
            letters = OPTION_LETTERS[:n_options]
            expect = {"answer": letters[correct], "kind": qa["kind"], "options": dict(zip(letters, options,
                                                                                           strict=True))}
            if spec.style == "mixed":  # MathVista: choices in the question and as a list; answer the choice text
                text = ("Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, "
                        f"at the end.\nQuestion: {qa['question']}\nChoices:\n"
                        + "\n".join(f"({k}) {v}" for k, v in zip(letters, options, strict=True)))
                row.update({"question": text, "answer": options[correct], "question_type": "multi_choice",
                            "answer_type": "text", "choices": repr(options), "task": "synthetic scenes"})
                expect.update({"question": text, "kind": "vqa"})  # MathVista has no category column
            else:
                hint = "Look at the objects on the floor." if i % 3 == 0 else ""
                row.update({"question": qa["question"], "hint": hint, "answer": letters[correct],
                            "category": qa["kind"], **dict(zip(letters, options, strict=True))})
                expect["question"] = build_prompt(qa["question"], expect["options"], hint or None, "mcq")
        elif spec.style == "yorn":
            from versavit.data.synthetic.scene import COLORS

            present = sorted({o["color"] for o in scene.objects})
            color = present[0] if i % 2 == 0 else next(c for c in COLORS if c not in present)
            text = f"Is there a {color} object in the image?"
            answer = "Yes" if i % 2 == 0 else "No"
            row.update({"question": text, "answer": answer, "category": "VS" if i % 2 else "VD"})
            expect = {"question": text, "answer": answer, "kind": row["category"]}
        else:  # open: count questions with alternatives as the real files write them, else the scene's question
            qa = _scene_question(scene, ("count",) if i % 2 == 0 else ("color", "shape", "count"))
            answer = qa["answer"]
            expect = {"question": qa["question"], "answer": answer, "kind": qa["kind"]}
            if qa["kind"] == "count" and name == "ocrbench":
                alternatives = [answer, _NUMBER_WORDS[int(answer)]]
                answer = expect["answer"] = repr(alternatives)
                expect["answers"] = alternatives
            elif qa["kind"] == "count" and name == "mmvet":
                answer = expect["answer"] = f"{answer}<OR>{_NUMBER_WORDS[int(answer)]}"
                expect["answers"] = [qa["answer"], _NUMBER_WORDS[int(qa["answer"])]]
            elif name == "ocrbench":
                answer = expect["answer"] = repr([answer])
                expect["answers"] = [qa["answer"]]
            row.update({"question": qa["question"], "answer": answer})
            if spec.style == "mixed":
                row.update({"question_type": "free_form", "answer_type": "integer" if qa["kind"] == "count"
                            else "text", "choices": "", "task": "synthetic scenes"})
                expect["kind"] = "vqa"
            else:
                row["category"] = qa["kind"]
        if name == "mmbench":
            row.update({"l2-category": "synthetic", "split": "dev"})
        if reference:
            truth["reference"] = truths[1]["index"]
        if name == "mmmu":
            row["split"] = "dev" if i >= FIXTURE_ROWS else "validation"
            truth["kept"] = i < FIXTURE_ROWS
            if i == 2:  # two images (image_path names them); the question refers to the first, which is kept
                truth["images"] = 2
                row["image_path"] = repr([f"{index}_1.jpg", f"{index}_2.jpg"])
                row["question"] = "<image 1> " + row["question"]
                expect["question"] = build_prompt(row["question"], expect["options"], row.get("hint") or None, "mcq")
        truth.update({"row": row, "target": {"key": index, "index": index, "qa": [expect]}})
        truths.append(truth)
    return truths


def _encode(image: Any, fmt: str) -> str:
    return base64.b64encode(codecs.encode_image(image, fmt)).decode("ascii")


def write_vlmevalkit_fixture(name: str):  # -> WriteFixture
    def write_fixture(folder: Path, seed: int) -> None:
        """<folder>/<the benchmark's TSV>: a few questions about synthetic scenes, images inline (base64)."""
        spec = spec_of(name)
        truths = fixture_truth(name, seed)
        rows = []
        for truth in truths:
            row = dict(truth["row"])
            row["image"] = _encode(truth["image"], spec.image_format)
            if "reference" in truth:  # the same image as another row, given by its index (as MMBench does)
                row["image"] = truth["reference"]
            if truth["images"] == 2:  # a list literal of two images (MMMU): the reader keeps the first
                row["image"] = repr([row["image"], _encode(truths[0]["image"], spec.image_format)])
            rows.append(row)
        columns: list[str] = []
        for row in rows:
            columns += [c for c in row if c not in columns]
        order = ["index", "image", "image_path", "question", "hint", *OPTION_LETTERS, "answer", "category"]
        columns = [c for c in order if c in columns] + [c for c in columns if c not in order]
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / spec.file, "w", encoding="utf-8", newline="") as f:
            # pandas' to_csv(sep='\t', index=False): minimal quoting, "\n" line ends
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(columns)
            for row in rows:
                writer.writerow([row.get(c, "") for c in columns])

    return write_fixture


def _source(spec: Spec) -> Source:
    kind = {"mcq": "multiple-choice (options A, B, ...)", "open": "open questions",
            "yorn": "yes/no questions", "mixed": "multiple-choice and free-form questions"}[spec.style]
    return Source(
        name=spec.name, kind="benchmark", tasks=("vqa",), splits=SPLITS,
        about=f"{spec.title}, a VQA benchmark of the paper's Table 2 (OpenCompass) as VLMEvalKit distributes it: "
        f"{spec.file}, one TSV with the images inline as base64 (tens to hundreds of MB; VLMEvalKit downloads it "
        f"into $LMUData from https://opencompass.openxlab.space/utils/VLMEval/{spec.file}); --input is the folder "
        f"holding it. {kind[0].upper() + kind[1:]}; split test = the rows VLMEvalKit evaluates"
        + (f" (the {spec.keep_split} rows)" if spec.keep_split else "") + "; the first image of each row kept as "
        "published, its question (VLMEvalKit's prompt, answer, options) in the sample's json.",
        list_units=list_vlmevalkit(spec.name), read_units=read_vlmevalkit(spec.name),
        write_fixture=write_vlmevalkit_fixture(spec.name), units_per_shard=256)


VLMEVALKIT_SOURCES: list[Source] = [_source(s) for s in SPECS.values()]
