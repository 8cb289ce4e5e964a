"""Data loading throughput: versavit's shard reader vs. a plain webdataset pipeline.

Both read the same 448x448 synthetic shards and decode every field the same way (RGB, 16-bit
depth, instance/semantic PNGs, JSON), in the same run, with 0 and 2 DataLoader workers. The
difference is what ours adds: fsspec opening (s3:// capable), a corrupt-data handler at every
stage with counts in shared memory, and field validation. Target: ours >= 90% of plain.

    python bench/data_loader.py [--samples 256] [--passes 3] [--out /tmp/versavit-bench]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import webdataset as wds

from versavit.config.schema import SyntheticConfig
from versavit.data.build import build_synthetic
from versavit.data.codecs import decode_sample
from versavit.data.loader import _as_is, make_loader, shard_pipeline
from versavit.data.shards import read_manifest


def plain_pipeline(urls: list[str]) -> wds.WebDataset:
    return wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node,
                          handler=wds.warn_and_continue, empty_check=False).map(decode_sample)


def ours_pipeline(urls: list[str]) -> wds.DataPipeline:
    return shard_pipeline(urls, required=("rgb.jpg", "depth.png", "json"))


def rate(make, urls: list[str], workers: int) -> float:
    loader = make_loader(make(urls), num_workers=workers) if make is ours_pipeline else \
        torch.utils.data.DataLoader(make(urls), batch_size=None, num_workers=workers, collate_fn=_as_is,
                                    prefetch_factor=4 if workers else None)
    start, n = time.perf_counter(), 0
    for sample in loader:
        n += 1
        assert sample["depth"].dtype.name == "float32"
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "versavit-bench-data"))
    args = ap.parse_args()
    url = os.path.join(args.out, f"synthetic448-{args.samples}")
    try:
        manifest = read_manifest(os.path.join(url, "train"))
    except Exception:
        print(f"rendering {args.samples} samples at 448x448 into {url} ...", flush=True)
        cfg = SyntheticConfig(num_train=args.samples, num_val=1, image_size=448, samples_per_shard=32)
        manifest = build_synthetic(url, cfg, splits=("train",), workers=os.cpu_count() or 1)["train"]
    urls = manifest.shard_urls()
    print(f"{manifest.num_samples} samples, {len(urls)} shards, "
          f"{sum(s.bytes for s in manifest.shards) / 2**20:.1f} MiB")
    print(f"{'workers':>7} {'plain wds (samples/s)':>22} {'versavit (samples/s)':>21} {'ratio':>6}")
    for workers in (0, 2):
        plain, ours = [], []
        rate(ours_pipeline, urls, workers)  # warm the page cache and imports
        for _ in range(args.passes):  # interleaved, so machine noise hits both alike
            plain.append(rate(plain_pipeline, urls, workers))
            ours.append(rate(ours_pipeline, urls, workers))
        p, o = statistics.median(plain), statistics.median(ours)
        print(f"{workers:>7} {p:>22.1f} {o:>21.1f} {o / p:>6.2f}")


if __name__ == "__main__":
    main()
