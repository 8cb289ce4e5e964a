"""Readers of the paper's data sources in their published layouts, and tiny stand-ins of those layouts.

Each format offers `list_*` (the work units of an input folder, for `versavit data prepare`), `read_*`
(samples of some units, skips counted per reason) and `write_*_fixture` (the layout rendered from the
synthetic world); versavit.data.prepare.training wires them into sources.

    detection      Objects365 / COCO detection JSON      -> boxes + class labels
                   GRIT grounded captions               -> boxes + phrases
    segmentation   SA-1B image + per-image JSON (RLE)    -> masks (+ DAM texts)
                   RefCOCO-family refs + COCO instances  -> mask.png + expression
    text           PixMo-Cap, SA-1B-InternVL, IDL-WDS    -> caption
                   FineVision conversations             -> question/answer turns

The one-shot `convert_*` functions write a whole (small) input as one dataset without sharding the work.
Field conventions: `versavit.data.convert.common`.
"""

from versavit.data.convert.common import (
    CORRUPT_REASONS,
    SkipRecord,
    image_jpeg,
    iter_records,
    load_image,
    write_dataset,
)
from versavit.data.convert.detection import coco_segmentation_rle, convert_coco_detection, convert_grit
from versavit.data.convert.segmentation import convert_refcoco, convert_sa1b, load_refs
from versavit.data.convert.text import conversation_turns, convert_captions, convert_conversations

__all__ = [
    "CORRUPT_REASONS",
    "SkipRecord",
    "coco_segmentation_rle",
    "conversation_turns",
    "convert_captions",
    "convert_coco_detection",
    "convert_conversations",
    "convert_grit",
    "convert_refcoco",
    "convert_sa1b",
    "image_jpeg",
    "iter_records",
    "load_image",
    "load_refs",
    "write_dataset",
]
