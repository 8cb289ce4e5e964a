"""Converters: a tiny fixture of each published format becomes task shards with our field conventions."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from versavit.data import codecs
from versavit.data.convert import (
    SkipRecord,
    convert_captions,
    convert_coco_detection,
    convert_conversations,
    convert_grit,
    convert_refcoco,
    convert_sa1b,
    image_jpeg,
    iter_records,
)
from versavit.data.loader import shard_pipeline
from versavit.data.shards import read_manifest, resolve_shards
from versavit.data.tasks import caption_view, refseg_view


def jpeg(h: int = 40, w: int = 60, seed: int = 0) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return codecs.encode_image(rgb, "jpg")


def png(h: int = 40, w: int = 60, seed: int = 0) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return codecs.encode_image(rgb, "png")


def read(url: str) -> list[dict]:
    return list(shard_pipeline(resolve_shards([url])))


def raw_images(url: str) -> dict[str, bytes]:
    import tarfile

    out = {}
    for shard in read_manifest(url).shard_urls():
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".rgb.jpg"):
                    out[m.name[:-len(".rgb.jpg")]] = tar.extractfile(m).read()
    return out


def test_image_jpeg_keeps_jpegs_and_reencodes_others() -> None:
    data = jpeg()
    assert image_jpeg(data) == (data, (40, 60))
    out, size = image_jpeg(png(30, 20))
    assert out[:3] == b"\xff\xd8\xff" and size == (30, 20)
    with pytest.raises(SkipRecord) as err:
        image_jpeg(data[: len(data) // 2])
    assert err.value.reason == "bad_image"


def test_iter_records_jsonl_json_parquet_folder(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"i": 0}\n\n{"i": 1}\n')
    (tmp_path / "b.json").write_text(json.dumps({"data": [{"i": 2}]}))
    pq.write_table(pa.table({"i": [3, 4]}), tmp_path / "c.parquet")
    (tmp_path / "ignored.txt").write_text("x")
    assert [r["i"] for r in iter_records(str(tmp_path))] == [0, 1, 2, 3, 4]


def test_coco_detection_objects365(tmp_path: Path) -> None:
    images = tmp_path / "images" / "v1" / "patch0"
    images.mkdir(parents=True)
    originals = {1: jpeg(seed=1), 2: png(seed=2)}
    (images / "o365_1.jpg").write_bytes(originals[1])
    (images / "o365_2.png").write_bytes(originals[2])
    ann = {
        "images": [{"id": 2, "file_name": "images/v1/patch0/o365_2.png", "height": 40, "width": 60},
                   {"id": 1, "file_name": "images/v1/patch0/o365_1.jpg", "height": 40, "width": 60},
                   {"id": 3, "file_name": "images/v1/patch0/missing.jpg", "height": 40, "width": 60},
                   {"id": 4, "file_name": "images/v1/patch0/o365_1.jpg", "height": 40, "width": 60}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [5, 6, 10, 12], "area": 120, "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [50, 30, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 2, "bbox": [0, 0, 60, 40], "area": 2400, "iscrowd": 1},
            {"id": 13, "image_id": 2, "category_id": 1, "bbox": [70, 50, 5, 5], "area": 25, "iscrowd": 0},
            {"id": 14, "image_id": 2, "category_id": 2, "bbox": [1, 1, 3, 3], "area": 9, "iscrowd": 0},
            {"id": 15, "image_id": 3, "category_id": 2, "bbox": [1, 1, 3, 3], "area": 9, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}],
    }
    (tmp_path / "zhiyuan_objv2_train.json").write_text(json.dumps(ann))
    out = str(tmp_path / "out")
    manifest = convert_coco_detection(str(tmp_path / "zhiyuan_objv2_train.json"), str(tmp_path), out,
                                      samples_per_shard=1)
    assert manifest.num_samples == 2 and len(manifest.shards) == 2  # image 3 missing, image 4 has no objects
    counts = manifest.meta["convert"]["counts"]
    assert counts == {"crowd_dropped": 1, "empty_box_dropped": 1, "missing_image": 1, "no_objects": 1, "records": 4,
                      "written": 2}
    samples = {s["__key__"]: s for s in read(out)}
    one = samples["objects365-1"]["json"]
    assert one["source"] == "objects365" and one["size"] == [40, 60]
    assert [(o["id"], o["label"], o["bbox"]) for o in one["objects"]] == [
        (1, "person", [5.0, 6.0, 15.0, 18.0]), (2, "car", [50.0, 30.0, 60.0, 40.0])]  # clipped to the image
    raw = raw_images(out)
    assert raw["objects365-1"] == originals[1]  # JPEG bytes untouched
    assert raw["objects365-2"][:3] == b"\xff\xd8\xff"  # PNG re-encoded
    assert samples["objects365-2"]["rgb.jpg"].shape == (40, 60, 3)


def test_coco_detection_keeps_polygon_masks(tmp_path: Path) -> None:
    (tmp_path / "1.jpg").write_bytes(jpeg())
    ann = {"images": [{"id": 1, "file_name": "1.jpg", "height": 40, "width": 60}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 10], "area": 200,
                            "segmentation": [[10, 10, 30, 10, 30, 20, 10, 20]]}],
           "categories": [{"id": 1, "name": "box"}]}
    (tmp_path / "a.json").write_text(json.dumps(ann))
    convert_coco_detection(str(tmp_path / "a.json"), str(tmp_path), str(tmp_path / "out"), source="coco",
                           keep_masks=True)
    [s] = read(str(tmp_path / "out"))
    mask = codecs.decode_rle(s["json"]["objects"][0]["segmentation"])
    assert mask.shape == (40, 60) and 150 < mask.sum() < 260 and mask[15, 20] and not mask[5, 5]


def test_grit_phrases_from_parquet_with_image_bytes(tmp_path: Path) -> None:
    caption = "a dog chasing a red ball in the park"
    recs = [
        {"key": "000001", "caption": caption, "jpg": jpeg(seed=3),
         "ref_exps": [[0, 5, 0.1, 0.2, 0.5, 0.9, 0.8], [14, 24, 0.6, 0.6, 0.7, 0.7, 0.3], [30, 38, 0, 0, 0, 0, 0.9]]},
        {"key": "000002", "caption": "nothing grounded", "jpg": jpeg(seed=4), "ref_exps": []},
    ]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "grit-000.parquet")
    manifest = convert_grit(str(tmp_path / "grit-000.parquet"), str(tmp_path / "out"), min_score=0.5)
    assert manifest.num_samples == 1
    assert manifest.meta["convert"]["counts"] == {"no_objects": 1, "phrases_dropped": 2, "records": 2, "written": 1}
    [s] = read(str(tmp_path / "out"))
    assert s["json"]["caption"] == caption
    assert s["json"]["objects"] == [{"id": 1, "bbox": [6.0, 8.0, 30.0, 36.0], "expression": "a dog", "score": 0.8}]


def test_grit_jsonl_with_image_folder(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "k1.jpg").write_bytes(jpeg())
    rec = {"key": "k1", "caption": "two cats", "noun_chunks": [[0, 8, 0.0, 0.0, 1.0, 1.0, 0.9]]}
    (tmp_path / "grit.jsonl").write_text(json.dumps(rec) + "\n")
    assert convert_grit(str(tmp_path / "grit.jsonl"), str(tmp_path / "a"), str(tmp_path / "imgs")).num_samples == 0
    m = convert_grit(str(tmp_path / "grit.jsonl"), str(tmp_path / "b"), str(tmp_path / "imgs"), use_noun_chunks=True)
    assert m.num_samples == 1 and read(str(tmp_path / "b"))[0]["json"]["objects"][0]["bbox"] == [0, 0, 60, 40]


def test_sa1b_rle_masks(tmp_path: Path) -> None:
    folder = tmp_path / "sa_000000"
    folder.mkdir()
    masks = []
    for i in (1, 2):
        m = np.zeros((40, 60), bool)
        m[5 * i:5 * i + 10, 10 * i:10 * i + 15] = True
        masks.append(m)
    anns = [{"id": 100 + i, "segmentation": codecs.encode_rle(m), "bbox": [10 * (i + 1), 5 * (i + 1), 15, 10],
             "area": int(m.sum()), "predicted_iou": 0.9 - 0.5 * i, "stability_score": 0.95,
             "point_coords": [[0, 0]], "crop_box": [0, 0, 60, 40]} for i, m in enumerate(masks)]
    anns[0]["description"] = "A small grey square"  # SA-1B-DAM style text
    wrong = codecs.encode_rle(np.zeros((10, 10), bool))
    anns.append({"id": 999, "segmentation": wrong, "bbox": [0, 0, 1, 1], "area": 0})
    (folder / "sa_1.jpg").write_bytes(jpeg(seed=5))
    (folder / "sa_1.json").write_text(json.dumps({"image": {"image_id": 1, "width": 60, "height": 40,
                                                            "file_name": "sa_1.jpg"}, "annotations": anns}))
    (folder / "sa_2.json").write_text("{not json")
    manifest = convert_sa1b(str(folder), str(tmp_path / "out"), min_predicted_iou=0.5)
    assert manifest.meta["convert"]["counts"] == {"bad_json": 1, "bad_mask_dropped": 1, "low_iou_dropped": 1,
                                                  "records": 2, "written": 1}
    [s] = read(str(tmp_path / "out"))
    [obj] = s["json"]["objects"]
    assert obj["id"] == 1 and obj["ann_id"] == 100 and obj["expression"] == "A small grey square"
    assert obj["bbox"] == [10.0, 5.0, 25.0, 15.0]
    assert np.array_equal(codecs.decode_rle(obj["segmentation"]), masks[0])


def test_refcoco_one_sample_per_sentence(tmp_path: Path) -> None:
    (tmp_path / "train2014").mkdir()
    (tmp_path / "train2014" / "COCO_train2014_000000000009.jpg").write_bytes(jpeg(seed=6))
    instances = {"images": [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "height": 40, "width": 60}],
                 "annotations": [{"id": 1, "image_id": 9, "category_id": 1, "bbox": [10, 10, 20, 10], "area": 200,
                                  "segmentation": [[10, 10, 30, 10, 30, 20, 10, 20]], "iscrowd": 0},
                                 {"id": 2, "image_id": 9, "category_id": 2, "bbox": [40, 20, 10, 10], "area": 100,
                                  "segmentation": [[40, 20, 50, 20, 50, 30, 40, 30]], "iscrowd": 0}],
                 "categories": [{"id": 1, "name": "bus"}, {"id": 2, "name": "man"}]}
    refs = [{"ref_id": 5, "ann_id": 1, "image_id": 9, "split": "train", "category_id": 1,
             "sentences": [{"sent": "the blue bus", "sent_id": 50}, {"sent": "bus on the left", "sent_id": 51}]},
            {"ref_id": 6, "ann_id": 2, "image_id": 9, "split": "val", "category_id": 2,
             "sentences": [{"sent": "man", "sent_id": 60}]}]
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs))
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    out = str(tmp_path / "out")
    manifest = convert_refcoco(str(tmp_path / "refs(unc).p"), str(tmp_path / "instances.json"),
                               str(tmp_path / "train2014"), out)
    assert manifest.num_samples == 2 and manifest.meta["convert"]["counts"]["other_split"] == 1
    assert set(manifest.fields) == {"rgb.jpg", "mask.png", "json"}
    samples = read(out)
    assert [s["__key__"] for s in samples] == ["refcoco-5-50", "refcoco-5-51"]
    assert [s["json"]["expression"] for s in samples] == ["the blue bus", "bus on the left"]
    s = samples[0]
    assert s["json"]["objects"] == [{"id": 1, "bbox": [10.0, 10.0, 30.0, 20.0], "label": "bus",
                                     "expression": "the blue bus", "ann_id": 1}]
    assert s["mask.png"].dtype == np.uint8 and set(np.unique(s["mask.png"])) == {0, 255}
    assert s["mask.png"][15, 20] == 255 and s["mask.png"][25, 45] == 0
    # the refseg task reads it once embeddings exist
    s["emb.npy"] = np.ones((1, 8), np.float16)
    assert refseg_view(s, 28)["mask"].sum() > 0
    # all splits, refs given as JSON
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    m = convert_refcoco(str(tmp_path / "refs.json"), str(tmp_path / "instances.json"), str(tmp_path / "train2014"),
                        str(tmp_path / "all"), source="refcoco+", splits=None)
    assert m.num_samples == 3 and read(str(tmp_path / "all"))[2]["__key__"] == "refcoco+-6-60"


def test_pixmo_captions(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(jpeg(seed=7))
    recs = [{"image": "a.jpg", "caption": "A photo of noise.", "transcripts": ["noise"]},
            {"image_url": "https://example.com/b.jpg", "caption": "Remote."},
            {"image": "a.jpg", "caption": ""},
            {"image": "missing.jpg", "caption": "Gone."}]
    (tmp_path / "pixmo.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    manifest = convert_captions(str(tmp_path / "pixmo.jsonl"), str(tmp_path / "out"), str(tmp_path / "img"))
    assert manifest.meta["convert"]["counts"] == {"missing_image": 1, "no_caption": 1, "records": 4,
                                                  "remote_image": 1, "written": 1}
    [s] = read(str(tmp_path / "out"))
    assert s["json"]["caption"] == "A photo of noise." and s["json"]["transcripts"] == ["noise"]
    view = caption_view(s, 28, 56)
    assert view["answer"] == "A photo of noise."


def test_finevision_keeps_single_image_samples(tmp_path: Path) -> None:
    def hf_image(seed: int) -> dict:  # how `datasets` stores an Image feature in parquet
        return {"bytes": png(seed=seed), "path": None}

    recs = [
        {"images": [hf_image(1)], "source": "chartqa",
         "texts": [{"user": "<image>\nWhat is the max?", "assistant": "42"}, {"user": "And min?", "assistant": "1"}]},
        {"images": [], "source": "text", "texts": [{"user": "Hi", "assistant": "Hello"}]},
        {"images": [hf_image(2), hf_image(3)], "source": "multi", "texts": [{"user": "Compare", "assistant": "Same"}]},
        {"images": [hf_image(4)], "source": "empty", "texts": [{"user": "", "assistant": ""}]},
    ]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "fv.parquet")
    manifest = convert_conversations(str(tmp_path / "fv.parquet"), str(tmp_path / "out"))
    assert manifest.meta["convert"]["counts"] == {"multi_image_dropped": 1, "no_turns": 1, "records": 4,
                                                  "text_only_dropped": 1, "written": 1}
    [s] = read(str(tmp_path / "out"))
    assert s["json"]["subset"] == "chartqa"
    assert s["json"]["conversations"] == [{"question": "What is the max?", "answer": "42"},
                                          {"question": "And min?", "answer": "1"}]
    assert caption_view(s, 28, 56)["answer"] in {"42", "1"}
    with Image.open(io.BytesIO(raw_images(str(tmp_path / "out"))[s["__key__"]])) as img:
        assert img.format == "JPEG" and img.size == (60, 40)


def test_convert_to_s3(s3: str, tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(jpeg())
    (tmp_path / "caps.json").write_text(json.dumps([{"image": str(tmp_path / "a.jpg"), "caption": "x"}]))
    manifest = convert_captions(str(tmp_path / "caps.json"), "s3://convert-bucket/caps")
    assert manifest.num_samples == 1 and read_manifest("s3://convert-bucket/caps").num_samples == 1


# ------------------------------------------------------------------------------------ shared layout readers


@pytest.mark.parametrize(("trailing_newline", "unit_bytes"), [(True, 1), (False, 5), (False, 64), (True, 1 << 20)])
def test_jsonl_units_take_each_line_once(tmp_path: Path, trailing_newline: bool, unit_bytes: int) -> None:
    """A unit takes the lines that start in its byte range: every line once, whatever the range size."""
    from collections import Counter

    from versavit.data.convert.common import read_record_unit, record_units

    lines = [json.dumps({"i": i, "pad": "x" * (i * 7 % 23)}) for i in range(40)]
    lines.insert(17, '{"i": broken')
    text = "\n".join(lines) + ("\n" if trailing_newline else "")
    (tmp_path / "a.jsonl").write_text(text)
    starts = [0]
    for line in text.splitlines(keepends=True)[:-1]:
        starts.append(starts[-1] + len(line))
    units = record_units(str(tmp_path), ["a.jsonl"], jsonl_unit_bytes=unit_bytes)
    counts: Counter = Counter()
    got = [(row, rec["i"]) for u in units for row, rec in read_record_unit(str(tmp_path), u, counts)]
    assert [i for _, i in got] == list(range(40)) and counts == {"records": 1, "bad_record": 1}
    assert [row for row, _ in got] == [str(s) for k, s in enumerate(starts) if k != 17]


def test_parquet_units_are_row_groups(tmp_path: Path) -> None:
    from collections import Counter

    from versavit.data.convert.common import read_record_unit, record_units

    pq.write_table(pa.table({"i": list(range(10))}), tmp_path / "t.parquet", row_group_size=3)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    units = record_units(str(tmp_path), ["bad.parquet", "t.parquet"])
    assert units == [["bad.parquet", 0, 1], ["t.parquet", 0, 1], ["t.parquet", 1, 2], ["t.parquet", 2, 3],
                     ["t.parquet", 3, 4]]
    counts: Counter = Counter()
    rows = [(row, rec["i"]) for u in units for row, rec in read_record_unit(str(tmp_path), u, counts)]
    assert rows == [(str(i), i) for i in range(10)] and counts == {"bad_file": 1}


def test_tar_groups_keep_samples_before_damage(tmp_path: Path) -> None:
    import tarfile
    from collections import Counter

    from versavit.data.convert.common import iter_tar_groups

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key in ("a", "b", "c"):
            for ext, data in (("jpg", jpeg(seed=ord(key))), ("json", b"{}")):
                info = tarfile.TarInfo(f"dir/{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    whole = buf.getvalue()
    (tmp_path / "ok.tar").write_bytes(whole)
    counts: Counter = Counter()
    assert [(k, sorted(f)) for k, f in iter_tar_groups(str(tmp_path / "ok.tar"), counts)] == [
        (f"dir/{k}", ["jpg", "json"]) for k in "abc"] and not counts
    (tmp_path / "cut.tar").write_bytes(whole[: len(whole) * 3 // 5])  # inside sample b's or c's members
    got = [k for k, _ in iter_tar_groups(str(tmp_path / "cut.tar"), counts)]
    assert got and got == ["dir/a", "dir/b"][: len(got)] and counts == {"bad_tar": 1}


def test_uncompressed_rle_decodes_to_the_mask() -> None:
    from versavit.data.convert.segmentation import uncompressed_rle

    rng = np.random.default_rng(0)
    for mask in (rng.random((7, 9)) > 0.5, np.ones((3, 4), bool), np.zeros((3, 4), bool)):
        rle = uncompressed_rle(mask)
        assert sum(rle["counts"]) == mask.size and np.array_equal(codecs.decode_rle(rle), mask)


def test_refs_pickle_written_by_python2_and_no_code(tmp_path: Path) -> None:
    from versavit.data.convert.segmentation import load_refs

    # protocol 2 as Python 2 writes it: str values are byte strings (SHORT_BINSTRING), here one non-ASCII
    py2 = (b"\x80\x02]q\x00(}q\x01(U\x06ref_idq\x02K\x05U\x05splitq\x03U\x05trainq\x04"
           b"U\x04sentq\x05U\x06caf\xe9 sq\x06ue.")
    (tmp_path / "refs(unc).p").write_bytes(py2)
    assert load_refs(str(tmp_path / "refs(unc).p")) == [{"ref_id": 5, "split": "train", "sent": "caf\xe9 s"}]
    (tmp_path / "evil.p").write_bytes(pickle.dumps([Path("x")]))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        load_refs(str(tmp_path / "evil.p"))
