"""The GPU-ready step (issue 14 item 3): fused AdamW on GPUs, pinned loader memory, DeepSpeed's overlap_comm and
bucket sizes from train.deepspeed, the expandable-segments allocator and TF32, the tower's attention selectable.
Checked here through the settings each part hands over (no GPU on this machine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from versavit.config import ConfigError, load_config
from versavit.config.schema import BackboneConfig
from versavit.models.backbone import VisionBackbone
from versavit.train import engine
from versavit.train.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[2]


def test_deepspeed_config_from_train_deepspeed() -> None:
    cfg = load_config(ROOT / "configs/tiny.yaml", ["train.deepspeed.reduce_bucket_size=200000000",
                                                   "train.deepspeed.allgather_bucket_size=300000000"])
    zo = engine.deepspeed_config(cfg.train, 3, 1.0, device="cuda")["zero_optimization"]
    assert zo == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 200_000_000,
                  "allgather_bucket_size": 300_000_000}
    cpu = engine.deepspeed_config(cfg.train, 3, 1.0, device="cpu")["zero_optimization"]
    assert cpu["overlap_comm"] is False and cpu["contiguous_gradients"] is False  # auto: GPUs only
    forced = load_config(ROOT / "configs/tiny.yaml", ["train.deepspeed.overlap_comm=true"])
    assert engine.deepspeed_config(forced.train, 1, 1.0, device="cpu")["zero_optimization"]["overlap_comm"] is True
    paper = load_config(ROOT / "configs/paper.yaml")
    assert paper.train.deepspeed.reduce_bucket_size == 500_000_000
    with pytest.raises(ConfigError):
        load_config(ROOT / "configs/tiny.yaml", ["train.deepspeed.overlap_com=true"])


def test_fused_adamw_on_gpus_only_by_default() -> None:
    cfg = load_config(ROOT / "configs/tiny.yaml").train.optim
    p = torch.nn.Parameter(torch.zeros(4, 4))
    default = build_optimizer([{"params": [p], "lr": 1e-3}], cfg)
    assert bool(default.defaults.get("fused")) == torch.cuda.is_available()
    fused = build_optimizer([{"params": [p], "lr": 1e-3}], cfg, fused=True)
    assert fused.defaults["fused"] is True
    p.grad = torch.ones(4, 4)
    fused.step()  # the fused kernel also exists on the CPU; on GPUs DeepSpeed hands it the fp32 partitions
    assert torch.all(p < 0)


def test_cuda_settings_allocator_and_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    try:
        engine.configure_cuda()
        import os

        assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    engine.configure_cuda()  # an explicit setting wins
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def test_pods_get_the_allocator_setting() -> None:
    from versavit.launch.base import container_env

    cfg = load_config(ROOT / "configs/paper.yaml")
    env = {e["name"]: e.get("value") for e in container_env(cfg)}
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_loader_pins_memory_on_gpus() -> None:
    import webdataset as wds

    from versavit.data.loader import make_loader

    loader = make_loader(wds.DataPipeline(lambda: iter([{"x": torch.zeros(2)}])))
    assert loader.pin_memory == torch.cuda.is_available()


def test_attention_implementation_reaches_the_tower() -> None:
    small = dict(embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)
    eager = VisionBackbone.build(BackboneConfig(**small, attn_implementation="eager"))
    assert eager.tower.config._attn_implementation == "eager"
    assert VisionBackbone.build(BackboneConfig(**small)).tower.config._attn_implementation == "sdpa"
    images = torch.rand(2, 3, 56, 56)
    torch.manual_seed(0)
    a = VisionBackbone.build(BackboneConfig(**small, attn_implementation="eager"))
    torch.manual_seed(0)
    b = VisionBackbone.build(BackboneConfig(**small))
    torch.testing.assert_close(a(images).maps, b(images).maps, rtol=1e-4, atol=1e-5)
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="FlashAttention2"):
            VisionBackbone.build(BackboneConfig(**small, attn_implementation="flash_attention_2"))
    with pytest.raises(ConfigError):
        load_config(ROOT / "configs/tiny.yaml", ["model.backbone.attn_implementation=flash"])


def test_cpu_process_group_builds_no_deepspeed_op(tmp_path: Path) -> None:
    """On CPU, DeepSpeed's torch backend would JIT-compile its shared-memory comm op (only for inference
    all-reduce) when the process group starts: ~40 s of C++ on 2 cores, redone whenever its cache looks stale.
    versavit's init_distributed starts the group without building it."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = (
        "import torch.distributed as dist, deepspeed.comm.comm as dscomm\n"
        "from versavit.config.schema import TrainConfig\n"
        "from versavit.train.engine import init_distributed\n"
        "print(init_distributed(TrainConfig()), dist.get_world_size(), dscomm.cdb.shm_comm_op)\n"
    )
    extensions = tmp_path / "torch_extensions"
    env = {**__import__("os").environ, "TORCH_EXTENSIONS_DIR": str(extensions), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-3:] == ["cpu", "1", "None"], res.stdout
    assert not extensions.exists() or not any(extensions.rglob("*.so")), "a DeepSpeed op was compiled"
