"""Converters from the published formats of the paper's data sources into task shards.

    convert_coco_detection   Objects365 / COCO detection JSON           -> boxes + class labels
    convert_grit             GRIT grounded-caption records              -> boxes + phrases
    convert_sa1b             SA-1B image + per-image JSON (RLE masks)   -> masks (+ DAM texts)
    convert_refcoco          RefCOCO-family refs + COCO instances       -> mask.png + expression
    convert_captions         image-caption records (Pixmo-cap)          -> caption
    convert_conversations    FineVision conversations (single image)    -> question/answer turns

Field conventions: `versavit.data.convert.common`.
"""

from versavit.data.convert.common import SkipRecord, image_jpeg, iter_records, load_image, write_dataset
from versavit.data.convert.detection import coco_segmentation_rle, convert_coco_detection, convert_grit
from versavit.data.convert.segmentation import convert_refcoco, convert_sa1b, load_refs
from versavit.data.convert.text import conversation_turns, convert_captions, convert_conversations

__all__ = [
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
