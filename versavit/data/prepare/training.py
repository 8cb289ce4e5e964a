"""The training sources of `versavit data prepare`: each reads the layout its authors publish (`about` says what to
download, the folder layout expected and the size) and writes the fields training reads:

    caption   json caption (PixMo-Cap, IDL-WDS pages, SA-1B-InternVL) or conversations (FineVision)
    refseg    objects with boxes (+ RLE masks, expressions where the source has them; SAM masks, describer
              texts and text embeddings come from the label steps), or mask.png + expression (RefCOCO);
              COCO-Stuff: one object per class present, its RLE mask and its name as the expression
    depth     the image (Depth-Anything-V2 disparity comes from `versavit label depth`)

The readers and fixture writers live in versavit.data.convert (one module per kind of format).
"""

from __future__ import annotations

from versavit.data.convert import cocostuff, detection, segmentation, text
from versavit.data.prepare.base import Source

OBJECTS365 = Source(
    name="objects365", kind="training", tasks=("depth", "refseg"), splits=("train", "val"),
    about="Objects365 v2 (objects365.org, also on OpenDataLab): 1.74M train images with ~25M boxes of 365 classes "
    "(the paper: 1.7M images pseudo-labelled for depth, 1.6M for referring segmentation via SAM masks from the boxes "
    "and DAM-3B texts). Download zhiyuan_objv2_train.json (val: zhiyuan_objv2_val.json) and the image patch tars "
    "(train patch0..patch50; ~370 GB of JPEGs, ~710 GB with the tars). Layout: <input>/annotations/"
    "zhiyuan_objv2_<split>.json (also <input>/<split>/ or <input>/), images under <input>/<split>/ at the JSON's "
    "file_name (images/v1/patchN/x.jpg) or, as the train tars unpack, at <input>/train/patchN/x.jpg. Samples: the "
    "image and its objects (box, class name); crowd boxes are dropped.",
    list_units=detection.list_objects365, read_units=detection.read_objects365,
    write_fixture=detection.write_objects365_fixture, units_per_shard=256)

GRIT = Source(
    name="grit", kind="training", tasks=("refseg",), splits=("train",),
    about="GRIT-20M (Kosmos-2; huggingface zzliang/GRIT): ~20.5M web image-text pairs whose referring expressions "
    "(ref_exps) and noun chunks carry boxes normalised to [0, 1]; the paper keeps 13.9M (boxes -> SAM masks). The "
    "release is parquet metadata with URLs: fetch the images with img2dataset --input_format parquet "
    "--output_format webdataset --save_additional_columns '[\"id\",\"noun_chunks\",\"ref_exps\"]' and a resize "
    "that keeps the aspect ratio (~1.5-2 TB at 512 px, an estimate). Layout: <input>/NNNNN.tar holding KEY.jpg, "
    "KEY.json (caption, ref_exps, noun_chunks, ...) and KEY.txt, with img2dataset's NNNNN.parquet and "
    "NNNNN_stats.json beside; or record files (parquet/jsonl) with a jpg/image bytes column or images/<key>.jpg. "
    "One output shard per input tar. Samples: image, caption, objects (box, expression = the phrase).",
    list_units=detection.list_grit, read_units=detection.read_grit, write_fixture=detection.write_grit_fixture,
    units_per_shard=1)

SA1B = Source(
    name="sa1b", kind="training", tasks=("depth", "refseg"), splits=("train",),
    about="SA-1B (Meta, ai.meta.com/datasets/segment-anything): 11M images (~1500 px short side) with 1.1B masks, in "
    "1000 tars sa_000000..sa_000999.tar of ~10-11 GB (~11 TB in all); the paper pseudo-labels depth on all 11.0M, "
    "and SA-1B-DAM's 0.6M described masks are ready-made referring segmentation. Unpack each tar into "
    "<input>/sa_XXXXXX/: sa_N.jpg + sa_N.json ({image: {image_id, width, height, file_name}, annotations: "
    "[{segmentation: compressed RLE, bbox, area, predicted_iou, stability_score, crop_box, point_coords}]}); every "
    "*.json below <input> is read, its image resolved beside it. Samples: image + objects (box, RLE mask; a "
    "description/caption field, as in SA-1B-DAM, becomes the expression). Masks whose RLE size is not the image's, "
    "or with area 0, are dropped and counted.",
    list_units=segmentation.list_sa1b, read_units=segmentation.read_sa1b,
    write_fixture=segmentation.write_sa1b_fixture, units_per_shard=64)


def _refer(name: str, about: str) -> Source:
    list_units, read_units, write_fixture = segmentation.refer_source_fns(name)
    return Source(name=name, kind="training", tasks=("refseg",), splits=segmentation.REFER_DATASETS[name][1],
                  about=about, list_units=list_units, read_units=read_units, write_fixture=write_fixture,
                  units_per_shard=256)


_REFER_LAYOUT = ("Download the refer toolkit's {zip} (lichengunc/refer: refs({by}).p, instances.json) and COCO "
                 "train2014 (82,783 images, 13 GB). Layout (refer's data root): <input>/{name}/refs({by}).p, "
                 "<input>/{name}/instances.json, <input>/images/mscoco/images/train2014/COCO_train2014_*.jpg. One "
                 "sample per sentence: the image, mask.png of the referred object, its expression. Units are refs; "
                 "the val/test splits are the evaluation's referring-segmentation benchmarks in the same format.")

REFCOCO = _refer("refcoco", "RefCOCO (UNC splits): 142,209 expressions for 50,000 objects in 19,994 COCO train2014 "
                 "images; expressions per split: train 120,624, val 10,834, testA 5,657, testB 5,095. "
                 + _REFER_LAYOUT.format(zip="refcoco.zip", by="unc", name="refcoco"))
REFCOCO_PLUS = _refer("refcoco+", "RefCOCO+ (UNC splits; no absolute location words): 141,564 expressions for "
                      "49,856 objects in 19,992 images; train 120,191, val 10,758, testA 5,726, testB 4,889. "
                      + _REFER_LAYOUT.format(zip="refcoco+.zip", by="unc", name="refcoco+"))
REFCOCOG = _refer("refcocog", "RefCOCOg (UMD splits, longer expressions): 95,010 expressions for 49,822 objects in "
                  "25,799 images; train 80,512, val 4,896, test 9,602. "
                  + _REFER_LAYOUT.format(zip="refcocog.zip", by="umd", name="refcocog"))

PIXMO_CAP = Source(
    name="pixmo-cap", kind="training", tasks=("caption",), splits=("train",),
    about="PixMo-Cap (allenai/pixmo-cap, ODC-BY): ~0.7M rows {image_url, caption (~200 words, from spoken "
    "descriptions), transcripts} in data/train-0000N-of-00004.parquet (~1.1 GB); the paper's caption warm-up uses "
    "0.6M (the URLs that still resolve). Images are URLs: fetch them into <input>/pixmo_images/<sha256(image_url) "
    "in hex> (Molmo's download layout; ~0.3-0.5 TB, an estimate), or use a re-upload whose rows carry an `image` "
    "bytes column. Layout: <input>/data/*.parquet (+ <input>/pixmo_images/). A row whose image file is absent counts "
    "as missing_image. Samples: image + caption (+ transcripts).",
    list_units=text.list_pixmo, read_units=text.read_pixmo, write_fixture=text.write_pixmo_fixture,
    units_per_shard=1)

IDL_WDS = Source(
    name="idl-wds", kind="training", tasks=("caption",), splits=("train",),
    about="IDL-WDS (pixparse/idl-wds; Industry Documents Library): ~3.4M documents / ~19M pages in webdataset tars "
    "idl-train-NNNNN.tar, each document as KEY.pdf, KEY.tif (the pages rendered, multi-page TIFF), KEY.json "
    "(Textract OCR: pages[].lines {text, bbox, score} and words) and KEY.ocr (several TB); the paper's warm-up uses "
    "4.7M OCR samples. Layout: <input>/idl-train-*.tar (a snapshot of the dataset repo). One sample per page with "
    "text: the TIFF page and, as its caption, the page's OCR lines. One output shard per input tar.",
    list_units=text.list_idl, read_units=text.read_idl, write_fixture=text.write_idl_fixture, units_per_shard=1)

FINEVISION = Source(
    name="finevision", kind="training", tasks=("caption",), splits=("train",),
    about="FineVision (HuggingFaceM4/FineVision): 24.3M samples, 17.3M images, ~5 TB of parquet in ~185 subsets; "
    "the paper's multi-task VQA stream keeps the 14.0M single-image samples. Download the repo snapshot to <input>: "
    "<input>/<subset>/train-NNNNN-of-NNNNN.parquet with rows {images: [{bytes, path}], texts: [{user, assistant}], "
    "source, *_ratings}. Text-only and multi-image rows are dropped and counted. Samples: image + conversations "
    "(question/answer turns, the <image> placeholder removed).",
    list_units=text.list_finevision, read_units=text.read_finevision, write_fixture=text.write_finevision_fixture,
    units_per_shard=4)

SA1B_INTERNVL = Source(
    name="sa1b-internvl", kind="training", tasks=("caption",), splits=("train",),
    about="InternVL-SA-1B-Caption (OpenGVLab): InternVL2-Llama3-76B captions of SA-1B images; "
    "internvl_sa1b_caption_11m_single_image_en.jsonl (11.4 GB) in InternVL's chat format {id, image, width, height, "
    "conversations: [{from: human, value}, {from: gpt, value}]}; the paper's warm-up uses 4.1M. It needs the SA-1B "
    "images (see `sa1b`). Layout: <input>/*.jsonl (put only the single-image English file there) and "
    "<input>/images/<the record's image path> (the SA-1B tars unpacked there, e.g. images/sa_000000/sa_1.jpg). "
    "Units are 256 KiB ranges of the JSONL. Samples: image + caption (the gpt turn).",
    list_units=text.list_sa1b_internvl, read_units=text.read_sa1b_internvl,
    write_fixture=text.write_sa1b_internvl_fixture, units_per_shard=1)

COCO_STUFF = Source(
    name="coco-stuff", kind="training", tasks=("refseg",), splits=("train", "val"),
    about="COCO-Stuff 164K (nightrome/cocostuff), used by the referring-segmentation fine-tune (paper Table 10) "
    "beside RefCOCO/+/g: pixel labels of 80 thing and 91 stuff classes on the COCO 2017 images. Download "
    "train2017.zip (118K images, 18 GB), val2017.zip (5K, 1 GB) and stuffthingmaps_trainval2017.zip (659 MB). Layout "
    "(the repo's setup): <input>/images/{train,val}2017/<id>.jpg and <input>/annotations/{train,val}2017/<id>.png "
    "(8-bit maps: 0-181 = the classes of labels.txt shifted by one, things 0-90, stuff 91-181; 255 = unlabeled). "
    "Samples: the image and one object per class covering at least 0.1% of it (RLE mask, the class name as the "
    "expression: 'wall-other' -> 'wall'); unlabelled pixels belong to no mask.",
    list_units=cocostuff.list_coco_stuff, read_units=cocostuff.read_coco_stuff,
    write_fixture=cocostuff.write_coco_stuff_fixture, units_per_shard=256)

TRAINING_SOURCES: list[Source] = [OBJECTS365, GRIT, SA1B, REFCOCO, REFCOCO_PLUS, REFCOCOG, PIXMO_CAP, IDL_WDS,
                                  FINEVISION, SA1B_INTERNVL, COCO_STUFF]
