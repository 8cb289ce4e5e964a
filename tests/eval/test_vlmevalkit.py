"""The VQA benchmarks as VLMEvalKit distributes them (versavit.data.prepare.vlmevalkit, versavit.eval.datasets.
vlmevalkit): the TSV parser (prompts built as VLMEvalKit's ImageMCQDataset.build_prompt builds them, list-literal
answers, multi-image rows, image references, bad rows skipped and counted, a TSV without the required columns),
and each benchmark's stand-in read back the same from its TSV and from the prepared shards."""

from __future__ import annotations

import base64
import csv
from pathlib import Path

import numpy as np
import pytest

from versavit.data import codecs
from versavit.data.prepare import SOURCES
from versavit.data.prepare.runner import prepare_dataset
from versavit.data.prepare.vlmevalkit import NAMES, SPECS, fixture_truth
from versavit.eval.datasets import BENCHMARKS, PreparedVLMEvalKit, VLMEvalKitTSV, open_benchmark

SEED = 3
# what VLMEvalKit's ImageMCQDataset.build_prompt asks for a row with a hint and options A-C (D empty), spelled out
MCQ_PROMPT = ("Hint: Count the balls.\nQuestion: How many balls are there?\nOptions:\nA. one\nB. two\nC. None of "
              "them\nPlease select the correct answer from the options above. \n")


def _b64(image: np.ndarray, fmt: str = "png") -> str:
    return base64.b64encode(codecs.encode_image(image, fmt)).decode()


def _image(value: int) -> np.ndarray:
    return np.full((12, 16, 3), value, np.uint8)


def _write(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow([row.get(c, "") for c in header])


def _read_all(reader) -> list[tuple[np.ndarray, dict]]:  # noqa: ANN001
    return [(image, target) for image, target in reader]


def test_every_benchmark_is_registered_with_its_source() -> None:
    assert NAMES == ("mmbench", "mmstar", "mmmu", "mathvista", "hallusionbench", "ai2d", "ocrbench", "mmvet")
    files = {n: SPECS[n].file for n in NAMES}
    assert files == {"mmbench": "MMBench_DEV_EN_V11.tsv", "mmstar": "MMStar.tsv", "mmmu": "MMMU_DEV_VAL.tsv",
                     "mathvista": "MathVista_MINI.tsv", "hallusionbench": "HallusionBench.tsv",
                     "ai2d": "AI2D_TEST.tsv", "ocrbench": "OCRBench.tsv", "mmvet": "MMVet.tsv"}
    for name in NAMES:
        entry = BENCHMARKS[name]
        assert entry.source == name and entry.train_split is None and entry.eval_split == "test"
        assert SOURCES[name].tasks == ("vqa",) and SOURCES[name].splits == ("test",)
        assert files[name] in SOURCES[name].about


def test_the_tsv_parser_builds_vlmevalkits_prompts_and_skips_bad_rows(tmp_path: Path) -> None:
    """One mmstar-named TSV with every kind of row; the published reader and `data prepare` agree on it."""
    good, other = _b64(_image(10)), _b64(_image(200), "jpg")
    header = ["index", "image", "question", "hint", "A", "B", "C", "D", "answer", "category", "split"]
    rows = [
        {"index": "1", "image": good, "question": "How many balls are there?", "hint": "Count the balls.",
         "A": "one", "B": "two", "C": "None of them", "D": "", "answer": "B", "category": "count"},
        # no hint (pandas' NA string "nan" is no hint), two options, no category
        {"index": "2", "image": other, "question": "Which colour?", "hint": "nan", "A": "red", "B": "blue",
         "answer": "A"},
        # open question, answers as a Python list literal (OCRBench): alternatives
        {"index": "3", "image": good, "question": "What is written?", "answer": "['foo', 'Bar']",
         "category": "ocr"},
        # two images as a list literal (MMMU): the first is kept
        {"index": "4", "image": repr([other, good]), "question": "<image 1> Which?", "A": "x", "B": "y",
         "answer": "B"},
        # the image of row 1, given by its index (MMBench)
        {"index": "5", "image": "1", "question": "Same picture?", "A": "yes", "B": "no", "answer": "A"},
        {"index": "6", "image": "%%%not base64%%%" * 8, "question": "q", "answer": "x"},  # bad_image
        {"index": "7", "image": base64.b64encode(b"not an image at all" * 8).decode(), "question": "q",
         "answer": "x"},  # bad_image: base64, but no image
        {"index": "8", "image": good, "question": "", "answer": "x"},  # bad_record: no question
        {"index": "9", "image": good, "question": "q", "A": "a", "B": "b", "answer": "E"},  # bad_record
        {"index": "10", "image": good, "question": "q", "answer": ""},  # bad_record: no answer
        {"index": "11", "image": "", "question": "q", "answer": "x"},  # missing_image
        {"index": "12", "image": "99", "question": "q", "answer": "x"},  # missing_image: no row 99
    ]
    raw = tmp_path / "raw"
    _write(raw / "MMStar.tsv", header, rows)
    expected_counts = {"records": 12, "samples": 5, "multi_image": 1, "bad_image": 2, "bad_record": 3,
                       "missing_image": 2}

    published = VLMEvalKitTSV(raw, "mmstar")
    assert dict(published.counts) == expected_counts
    samples = _read_all(published)
    targets = {t["index"]: t for _, t in samples}
    assert list(targets) == ["1", "2", "3", "4", "5"]
    qa = {k: t["qa"][0] for k, t in targets.items()}
    assert qa["1"] == {"question": MCQ_PROMPT, "answer": "B", "kind": "count",
                       "options": {"A": "one", "B": "two", "C": "None of them"}}
    assert qa["2"]["question"] == ("Question: Which colour?\nOptions:\nA. red\nB. blue\nPlease select the correct "
                                   "answer from the options above. \n") and qa["2"]["kind"] == "vqa"
    # an open question of an MCQ dataset is asked as ImageMCQDataset asks it: "Question: ...\n"
    assert qa["3"] == {"question": "Question: What is written?\n", "answer": "['foo', 'Bar']", "kind": "ocr",
                       "answers": ["foo", "Bar"]}
    assert qa["4"]["question"].startswith("Question: <image 1> Which?\nOptions:\nA. x\nB. y\n")
    images = {t["index"]: im for im, t in samples}
    assert (images["1"] == 10).all() and images["1"].shape == (12, 16, 3)
    assert abs(int(images["4"].mean()) - 200) <= 2  # the first of the two images (a JPEG)
    assert (images["5"] == images["1"]).all()  # the referenced row's image
    assert targets["1"] == {"key": "1", "index": "1", "qa": [qa["1"]]}

    summary = prepare_dataset("mmstar", str(raw), str(tmp_path / "bench" / "test"), "test", units_per_shard=2)
    assert summary["counts"] == expected_counts and summary["corrupt"] == 7  # multi_image is not corrupt
    prepared = open_benchmark(f"mmstar={tmp_path / 'bench'}", str(tmp_path))
    assert isinstance(prepared.eval, PreparedVLMEvalKit) and prepared.tasks == ("vqa",) and prepared.train is None
    again = _read_all(prepared.eval)
    assert [t for _, t in again] == [t for _, t in samples]  # row 5's image from another shard's row
    assert all((a == b).all() for (a, _), (b, _) in zip(again, samples, strict=True))


def test_a_tsv_without_the_required_columns_is_one_clear_error(tmp_path: Path) -> None:
    _write(tmp_path / "OCRBench.tsv", ["index", "image", "question", "category"], [{"index": "1"}])
    with pytest.raises(ValueError, match=r"no column\(s\) answer .*re-download"):
        VLMEvalKitTSV(tmp_path, "ocrbench")
    with pytest.raises(ValueError, match=r"no column\(s\) answer"):
        prepare_dataset("ocrbench", str(tmp_path), str(tmp_path / "out"), "test")
    _write(tmp_path / "MMVet.tsv", ["index", "question", "answer"], [{"index": "1"}])
    with pytest.raises(ValueError, match="image or image_path"):
        VLMEvalKitTSV(tmp_path, "mmvet")
    from versavit.storage import StorageError

    with pytest.raises(StorageError, match="no AI2D_TEST.tsv"):
        VLMEvalKitTSV(tmp_path, "ai2d")


@pytest.mark.parametrize("name", NAMES)
def test_stand_in_read_back_the_same_from_the_tsv_and_the_shards(name: str, tmp_path: Path) -> None:
    SOURCES[name].write_fixture(tmp_path / "raw", SEED)
    assert (tmp_path / "raw" / SPECS[name].file).is_file()
    truths = [t for t in fixture_truth(name, SEED) if t["kept"]]
    summary = prepare_dataset(name, str(tmp_path / "raw"), str(tmp_path / "bench" / "test"), "test",
                              units_per_shard=3)
    multi = sum(t["images"] > 1 for t in truths)
    assert summary["counts"] == {"records": len(truths), "samples": len(truths), **({"multi_image": multi}
                                                                                    if multi else {})}
    published = open_benchmark(f"{name}={tmp_path / 'raw'}", str(tmp_path))
    prepared = open_benchmark(f"{name}={tmp_path / 'bench'}", str(tmp_path))
    assert isinstance(published.eval, VLMEvalKitTSV) and isinstance(prepared.eval, PreparedVLMEvalKit)
    assert len(published.eval) == len(prepared.eval) == len(truths)
    for (image, target), (image2, target2), truth in zip(published.eval, prepared.eval, truths, strict=True):
        assert target == target2 == truth["target"]
        assert (image == image2).all() and image.shape == truth["image"].shape
        assert np.abs(image.astype(int) - truth["image"]).mean() < 8  # the scene asked about (JPEG or PNG)
    questions = [t["target"]["qa"][0] for t in truths]
    style = SPECS[name].style
    if style == "mcq":
        assert all(q["options"] and q["answer"] in q["options"] for q in questions)
        assert all(q["question"].startswith(("Hint: ", "Question: ")) for q in questions)
    elif style == "mixed":  # MathVista: both kinds, the choices in the question text
        assert 0 < sum("options" in q for q in questions) < len(questions)
        assert all("Choices:" in q["question"] for q in questions if "options" in q)
    else:
        assert not any("options" in q for q in questions)
    if name == "ocrbench":
        assert all(q["answer"].startswith("['") and q["answers"] for q in questions)
    if name == "hallusionbench":
        assert {q["answer"] for q in questions} == {"Yes", "No"}
    if name == "mmvet":
        assert any("<OR>" in q["answer"] and len(q["answers"]) == 2 for q in questions)
    if name == "mmstar":
        assert 0 < sum(q["question"].startswith("Hint: ") for q in questions) < len(questions)
        assert all(len(q["options"]) >= 3 for q in questions)


def test_mmmu_keeps_its_validation_rows_only(tmp_path: Path) -> None:
    SOURCES["mmmu"].write_fixture(tmp_path, SEED)
    with open(tmp_path / "MMMU_DEV_VAL.tsv", encoding="utf-8", newline="") as f:
        splits = [r["split"] for r in csv.DictReader(f, delimiter="\t")]
    assert splits.count("dev") == 2 and splits.count("validation") == len(VLMEvalKitTSV(tmp_path, "mmmu"))
