"""Image + text records -> caption / VQA shards.

- `convert_captions`: image-caption records (Pixmo-cap style: `image` or `image_url` + `caption`;
  `transcripts` are kept when present). json: {"caption"}.
- `convert_conversations`: FineVision-style records: `images` (a list), `texts` = [{"user",
  "assistant"}, ...] turns, `source`. Only single-image samples are kept (the recipe's VQA data);
  text-only and multi-image records are dropped and counted. json: {"conversations":
  [{"question", "answer"}]} (what the caption task reads).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator

from versavit.data.convert.common import SkipRecord, image_jpeg, iter_records, load_image, safe_key, write_dataset
from versavit.data.shards import Manifest

# The image placeholder some conversation sets put in the first user turn: the model places the
# image itself, so the placeholder would be a literal string in the question.
_IMAGE_PLACEHOLDER = re.compile(r"^\s*<image>\s*|\s*<image>\s*$")


def _caption_samples(records_url: str, images_url: str | None, source: str, counts: Counter) -> Iterator[dict]:
    for n, rec in enumerate(iter_records(records_url)):
        counts["records"] += 1
        caption = (rec.get("caption") or "").strip()
        if not caption:
            counts["no_caption"] += 1
            continue
        try:
            ref = rec.get("image") or rec.get("image_path") or rec.get("image_url")
            jpeg, (h, w) = image_jpeg(load_image(ref, images_url))
        except SkipRecord as skip:
            counts[skip.reason] += 1
            continue
        meta = {"source": source, "caption": caption, "size": [h, w]}
        if rec.get("image_url"):
            meta["image_url"] = rec["image_url"]
        if rec.get("transcripts"):
            meta["transcripts"] = list(rec["transcripts"])
        yield {"__key__": safe_key(source, rec.get("key") or rec.get("id") or f"{n:09d}"), "rgb.jpg": jpeg,
               "json": meta}


def convert_captions(records_url: str, output_url: str, images_url: str | None = None, *,
                     source: str = "pixmo-cap", samples_per_shard: int = 256) -> Manifest:
    """Image-caption records -> caption shards (warm-up / caption task)."""
    counts: Counter = Counter()
    meta = {"convert": {"format": "captions", "records": records_url, "images": images_url}}
    return write_dataset(_caption_samples(records_url, images_url, source, counts), output_url, source, meta,
                         counts, samples_per_shard)


def conversation_turns(texts: list[dict]) -> list[dict[str, str]]:
    """FineVision `texts` turns -> [{"question", "answer"}], dropping empty turns."""
    turns = []
    for t in texts or []:
        question = _IMAGE_PLACEHOLDER.sub("", str(t.get("user") or t.get("question") or "")).strip()
        answer = str(t.get("assistant") or t.get("answer") or "").strip()
        if question and answer:
            turns.append({"question": question, "answer": answer})
    return turns


def _conversation_samples(records_url: str, images_url: str | None, source: str,
                          counts: Counter) -> Iterator[dict]:
    for n, rec in enumerate(iter_records(records_url)):
        counts["records"] += 1
        images = rec.get("images")
        if images is None and rec.get("image") is not None:
            images = [rec["image"]]
        images = [im for im in (images or []) if im is not None]
        if not images:
            counts["text_only_dropped"] += 1
            continue
        if len(images) > 1:
            counts["multi_image_dropped"] += 1
            continue
        turns = conversation_turns(rec.get("texts") or rec.get("conversations") or [])
        if not turns:
            counts["no_turns"] += 1
            continue
        try:
            jpeg, (h, w) = image_jpeg(load_image(images[0], images_url))
        except SkipRecord as skip:
            counts[skip.reason] += 1
            continue
        subset = rec.get("source") or source
        yield {"__key__": safe_key(source, rec.get("id") or f"{n:09d}"), "rgb.jpg": jpeg,
               "json": {"source": source, "subset": subset, "size": [h, w], "conversations": turns}}


def convert_conversations(records_url: str, output_url: str, images_url: str | None = None, *,
                          source: str = "finevision", samples_per_shard: int = 256) -> Manifest:
    """FineVision-style conversation records -> single-image VQA shards."""
    counts: Counter = Counter()
    meta = {"convert": {"format": "conversations", "records": records_url, "images": images_url}}
    return write_dataset(_conversation_samples(records_url, images_url, source, counts), output_url, source, meta,
                         counts, samples_per_shard)
