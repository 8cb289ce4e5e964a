"""Field codecs: 16-bit depth survives, RLE round-trips, corrupt bytes raise."""

from __future__ import annotations

import numpy as np
import pytest

from versavit.data import codecs


def test_depth_png_keeps_16_bit_precision() -> None:
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.5, 40.0, (37, 53)).astype(np.float32)
    depth[0, :5] = 0  # invalid pixels
    data, scale = codecs.encode_depth(depth)
    back, valid = codecs.decode_depth(data, scale)
    assert codecs.decode_png(data).dtype == np.uint16
    assert not valid[0, :5].any() and valid[1:].all()
    # 16-bit over a 40 m range: error <= half a code (~0.3 mm); 8-bit would be ~8 cm.
    assert np.abs(back[valid] - depth[valid]).max() <= 0.5 / scale + 1e-6
    assert len(np.unique(codecs.decode_png(data))) > 256


def test_webdataset_pil_decoder_would_lose_depth_bits() -> None:
    """Why decode_png exists: webdataset's "pil" image decoder turns 16-bit PNG into 8-bit."""
    import webdataset as wds

    depth = np.linspace(1, 10, 64 * 64, dtype=np.float32).reshape(64, 64)
    data, _ = codecs.encode_depth(depth)
    decoded = np.asarray(wds.autodecode.imagehandler("rgb8")("png", data))
    assert decoded.dtype == np.uint8 and len(np.unique(decoded)) <= 256
    assert len(np.unique(codecs.decode_png(data))) == 64 * 64


def test_label_png_and_rle_round_trip() -> None:
    rng = np.random.default_rng(1)
    inst = rng.integers(0, 700, (40, 30)).astype(np.uint16)
    sem = rng.integers(0, 6, (40, 30)).astype(np.uint8)
    assert np.array_equal(codecs.decode_png(codecs.encode_png(inst)), inst)
    out = codecs.decode_png(codecs.encode_png(sem))
    assert out.dtype == np.uint8 and np.array_equal(out, sem)
    mask = rng.random((40, 30)) > 0.7
    rle = codecs.encode_rle(mask)
    assert isinstance(rle["counts"], str)
    assert np.array_equal(codecs.decode_rle(rle), mask)
    # uncompressed COCO counts (as in some published annotation files)
    flat = mask.flatten(order="F").astype(int)
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    assert np.array_equal(codecs.decode_rle({"size": [40, 30], "counts": runs}), mask)


def test_embeddings_are_float16_npy() -> None:
    emb = np.random.default_rng(2).standard_normal((3, 384)).astype(np.float32)
    back = codecs.decode_npy(codecs.encode_npy(emb))
    assert back.dtype == np.float16 and back.shape == (3, 384)
    assert np.allclose(back, emb, atol=1e-2)


def test_decode_sample_raises_on_corrupt_image() -> None:
    raw = {"__key__": "a", "rgb.jpg": b"\xff\xd8 not really a jpeg", "json": b"{}"}
    with pytest.raises(Exception):  # noqa: B017 - PIL raises its own error types
        codecs.decode_sample(raw)
    with pytest.raises(ValueError, match="depth.scale"):
        codecs.decode_sample({"__key__": "b", "depth.png": codecs.encode_depth(np.ones((4, 4)))[0],
                              "json": b"{}"})


def test_lazy_sample_decodes_on_access_like_decode_sample() -> None:
    depth = np.linspace(1, 9, 16, dtype=np.float32).reshape(4, 4)
    png, scale = codecs.encode_depth(depth)
    raw = {"__key__": "k", "depth.png": png, "json": codecs.encode_json({"depth": {"scale": scale}}),
           "rgb.png": b"not a png", "txt": b"hello"}
    lazy = codecs.LazySample(raw)
    assert set(lazy) == {"__key__", "json", "rgb.png", "txt", "depth", "depth_valid"} and "depth.png" not in lazy
    assert lazy["txt"] == "hello" and np.allclose(lazy["depth"], depth, rtol=1e-3) and lazy["depth_valid"].all()
    assert lazy.get("inst.png") is None
    with pytest.raises(Exception, match="cannot identify|not a png|PNG"):
        lazy["rgb.png"]  # corrupt bytes raise when (and only when) read
