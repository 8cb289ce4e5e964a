"""Field encodings inside a shard sample, one place for both directions.

Depth is a 16-bit PNG plus the scale that recovers metres (or disparity units), because 8-bit
loses the signal: webdataset's "pil" decoder silently converts 16-bit PNGs to 8-bit, so every
PNG here is decoded by `decode_png`, which keeps the bit depth.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from PIL import Image

DEPTH_MAX_CODE = 65535


def encode_image(rgb: np.ndarray, fmt: str = "jpg", quality: int = 95) -> bytes:
    """[H, W, 3] uint8 -> JPEG/PNG bytes."""
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    if fmt in ("jpg", "jpeg"):
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Image bytes -> [H, W, 3] uint8 RGB."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def encode_png(label: np.ndarray) -> bytes:
    """A uint8 or uint16 map -> lossless PNG of the same bit depth (fast compression)."""
    if label.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"label PNG needs uint8 or uint16, got {label.dtype}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(label)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> array, keeping 16-bit maps 16-bit (uint16) and 8-bit maps uint8."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode in ("I;16", "I;16B", "I;16L"):
            return np.asarray(img, dtype=np.uint16)
        if img.mode == "I":  # some writers store 16-bit grey as 32-bit I
            return np.asarray(img).astype(np.uint16)
        if img.mode in ("L", "P", "1"):
            return np.asarray(img.convert("L") if img.mode == "1" else img, dtype=np.uint8)
        return np.asarray(img)


def encode_depth(depth: np.ndarray, valid: np.ndarray | None = None) -> tuple[bytes, float]:
    """Float depth/disparity -> (16-bit PNG, scale) with value = code / scale; code 0 = invalid.

    The scale is chosen per map so its largest valid value uses the full 16-bit range.
    """
    depth = np.asarray(depth, dtype=np.float32)
    ok = np.isfinite(depth) & (depth > 0)
    if valid is not None:
        ok &= valid
    if not ok.any():
        return encode_png(np.zeros(depth.shape, np.uint16)), 1.0
    scale = float(DEPTH_MAX_CODE / float(depth[ok].max()))
    codes = np.zeros(depth.shape, np.uint16)
    codes[ok] = np.clip(np.rint(depth[ok] * scale), 1, DEPTH_MAX_CODE).astype(np.uint16)
    return encode_png(codes), scale


def decode_depth(data: bytes, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """16-bit PNG + scale -> (float32 map, bool valid mask)."""
    codes = decode_png(data)
    if codes.dtype != np.uint16:
        raise ValueError(f"depth PNG must be 16-bit, got {codes.dtype}")
    return codes.astype(np.float32) / np.float32(scale), codes > 0


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Binary mask -> COCO compressed RLE ({"size": [h, w], "counts": str})."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE (compressed string or uncompressed list counts) -> bool mask."""
    from pycocotools import mask as mask_utils

    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    else:
        rle = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(bool)


def encode_npy(array: np.ndarray, dtype: Any = np.float16) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, dtype=dtype), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_json(data: bytes) -> Any:
    return json.loads(data)


# Field name (the part after the sample key in the tar member name) -> decoder.
# Depth needs its scale from the JSON metadata, so it is decoded in `decode_sample`.
DECODERS = {
    "jpg": decode_image,
    "jpeg": decode_image,
    "rgb.jpg": decode_image,
    "rgb.png": decode_image,
    "png": decode_png,
    "inst.png": decode_png,
    "sem.png": decode_png,
    "mask.png": decode_png,
    "json": decode_json,
    "emb.npy": decode_npy,
    "npy": decode_npy,
    "txt": bytes.decode,
}


def _decode_field(raw: dict[str, Any], name: str, decoded: dict[str, Any]) -> Any:
    """One field of a decoded sample: "depth"/"depth_valid" come from depth.png + json depth.scale."""
    if name in ("depth", "depth_valid"):
        if "json" in raw and "json" not in decoded:
            decoded["json"] = DECODERS["json"](raw["json"])
        scale = ((decoded.get("json") or {}).get("depth") or {}).get("scale")
        if scale is None:
            raise ValueError(f"sample {raw.get('__key__')} has depth.png but no json depth.scale")
        decoded["depth"], decoded["depth_valid"] = decode_depth(raw["depth.png"], scale)
        return decoded[name]
    value = raw[name]
    return DECODERS[name](value) if name in DECODERS and not name.startswith("__") else value


def _decoded_names(raw: dict[str, Any]) -> list[str]:
    names = [n for n in raw if n != "depth.png"]
    return names + (["depth", "depth_valid"] if "depth.png" in raw else [])


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Decode every known field of a raw webdataset sample; raise on anything corrupt."""
    out: dict[str, Any] = {}
    for name in _decoded_names(raw):
        if name not in out:
            out[name] = _decode_field(raw, name, out)
    return out


class LazySample(Mapping):
    """A raw sample that decodes a field on first access, with `decode_sample`'s names and errors.

    A task reads a few fields of a sample that carries every task's annotations (the synthetic world
    has image, depth, instance and class maps): decoding only those halves the loader's CPU time, which
    on a CPU node is time taken from the training step. Corrupt fields raise when read, so a task
    skips exactly the samples whose fields it needs are corrupt.
    """

    def __init__(self, raw: dict[str, Any]):
        self._raw = raw
        self._names = _decoded_names(raw)
        self._decoded: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._decoded:
            if name not in self._names:
                raise KeyError(name)
            self._decoded[name] = _decode_field(self._raw, name, self._decoded)
        return self._decoded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names
