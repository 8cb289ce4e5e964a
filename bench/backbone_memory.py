"""Memory to build the paper-size vision tower (Qwen2-VL ViT: embed 1280, depth 32, 16 heads, mlp 4) in bf16.

VisionBackbone.build creates the weights directly in the requested dtype, so building costs about the
bf16 parameter bytes; building in fp32 and casting afterwards (`--naive`) costs ~2x at peak (the fp32 weights),
which is what gets a DeepSpeed rank OOM-killed on a small machine. Target: peak RSS increase during
the build <= 1.3x the bf16 parameter bytes.

    python bench/backbone_memory.py [--kind qwen2_vl|qwen2_5_vl] [--naive]

Peak RSS is the kernel's high-water mark (VmHWM), reset just before the build through
/proc/self/clear_refs (Linux), so it covers the build only.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from versavit.config.schema import BackboneConfig
from versavit.models.backbone import VisionBackbone


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    parser.add_argument("--naive", action="store_true", help="build in fp32, then cast to bf16 (for comparison)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = BackboneConfig(kind=args.kind, embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0,
                         gradient_checkpointing=False)

    before = _status_kib("VmRSS") or 0
    exact = _reset_peak()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    if args.naive:
        model = VisionBackbone.build(cfg, dtype=torch.float32).to(torch.bfloat16)
    else:
        model = VisionBackbone.build(cfg, dtype=torch.bfloat16)
    seconds = time.perf_counter() - start
    after = _status_kib("VmRSS") or 0
    peak = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if not exact:  # without a reset the high-water mark may predate the build: a lower bound on the ratio
        peak = max(peak, maxrss_before)

    params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    increase = (peak - before) * 1024
    print(f"kind                       {args.kind} ({'fp32 build + cast' if args.naive else 'direct bf16 build'})")
    print(f"parameters                 {params / 1e6:.1f} M  ({', '.join(dtypes)})")
    print(f"  of which unused merger   {sum(p.numel() for p in model.tower.merger.parameters()) / 1e6:.1f} M")
    print(f"bf16 parameter bytes       {param_bytes / 2**30:.3f} GiB")
    print(f"peak RSS increase (build)  {increase / 2**30:.3f} GiB{'' if exact else ' (approx.: VmHWM not reset)'}")
    print(f"RSS increase after build   {(after - before) * 1024 / 2**30:.3f} GiB")
    print(f"ratio peak / param bytes   {increase / param_bytes:.2f}  (target <= 1.3)")
    print(f"build time                 {seconds:.1f} s")


if __name__ == "__main__":
    main()
