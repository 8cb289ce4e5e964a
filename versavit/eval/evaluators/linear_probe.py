"""Linear probes on frozen final-layer features (paper Tables 3 and 14; DINOv2 / DINOv3 linear protocol).

Segmentation at `eval.probe.seg_resolution` (560 px: Table 3) and at every `extra_seg_resolutions` entry (448 px:
Table 14), depth at `eval.probe.depth_resolution`; features cached per (backbone, split, resolution) by
versavit.eval.features, heads trained by versavit.eval.probe. With `eval.probe.lr_grid`, one head per learning
rate is trained and the best on the evaluation split is reported, as DINOv2's linear evaluation does (an
optimistic choice: the same split selects and scores; the chosen rate is recorded as `seg_lr` / `depth_lr`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from versavit.eval.evaluators.base import EvalResult, Evaluator, MetricSpec, register
from versavit.eval.features import cached_features
from versavit.eval.probe import ProbeResult, ProbeSettings, train_depth_probe, train_seg_probe

if TYPE_CHECKING:
    from pathlib import Path

    from versavit.eval.candidates import Candidate
    from versavit.eval.datasets import Benchmark

MIOU = MetricSpec("mIoU")
RMSE = MetricSpec("RMSE", higher_is_better=False, scale=1.0, fmt=".3f")


@register
class LinearProbe(Evaluator):
    name = "linear-probe"
    title = "Linear probes, frozen backbone (paper Tables 3 and 14; Table 4 for task ablations)"
    paper_table = "Table 3"
    benchmarks_help = "segmentation (ade20k, cityscapes, voc) and depth (nyu, kitti) with a train split; synthetic"
    metric_specs = {
        "seg_miou": MIOU,
        "seg_acc": MetricSpec("pixel acc."),
        "depth_rmse": RMSE,
        "depth_absrel": MetricSpec("AbsRel", higher_is_better=False),
        "depth_delta1": MetricSpec("δ1"),
    }

    def applies_to(self, benchmark: Benchmark) -> bool:
        return benchmark.train is not None and any(t in benchmark.tasks for t in ("seg", "depth"))

    @property
    def probe_settings(self) -> ProbeSettings:
        return replace(ProbeSettings.from_config(self.ctx.cfg.eval), device=self.ctx.device)

    def _specs(self) -> dict[str, MetricSpec]:
        extra = {f"seg_miou_{r}px": MetricSpec(f"mIoU@{r}") for r in self.ctx.cfg.eval.probe.extra_seg_resolutions}
        return {**self.metric_specs, **extra}

    def columns(self) -> dict[str, MetricSpec]:
        """The report's columns: seg mIoU at each resolution, depth RMSE / AbsRel / δ1."""
        specs = self._specs()
        return {k: specs[k] for k in ("seg_miou", *(k for k in specs if k.startswith("seg_miou_")), "depth_rmse",
                                      "depth_absrel", "depth_delta1")}

    def _fit(self, train_fn: Any, settings: ProbeSettings, higher_better: bool, key: str) -> tuple[ProbeResult, float]:
        """One head at settings.lr, or the best of eval.probe.lr_grid on the evaluation split."""
        grid = self.ctx.cfg.eval.probe.lr_grid or [settings.lr]
        best: tuple[ProbeResult, float] | None = None
        for lr in grid:
            result = train_fn(replace(settings, lr=lr))
            score = result.metrics[key]
            if best is None or (score > best[0].metrics[key] if higher_better else score < best[0].metrics[key]):
                best = (result, lr)
        assert best is not None
        return best

    def run(self, candidate: Candidate, benchmark: Benchmark) -> EvalResult:
        probe, settings = self.ctx.cfg.eval.probe, self.probe_settings
        result = EvalResult(self.name, benchmark.name, candidate.name)
        backbone = candidate.load_backbone()

        def features(resolution: int) -> tuple[Any, Any]:
            return tuple(cached_features(backbone, reader, resolution, self.ctx.cache, batch_size=probe.batch_size,
                                         digest=candidate.digest, label=candidate.name)
                         for reader in (benchmark.train, benchmark.eval))  # type: ignore[return-value]

        specs = self._specs()
        label = f"{candidate.name} {benchmark.name}"
        if "seg" in benchmark.tasks:
            ev = benchmark.eval
            for i, res in enumerate([probe.seg_resolution, *probe.extra_seg_resolutions]):
                train, val = features(res)
                def seg(s: ProbeSettings, t: Any = train, v: Any = val, r: int = res) -> ProbeResult:
                    return train_seg_probe(t, v, ev.num_classes, s, ev.ignore_index, f"{label} seg {r}px")

                fit, lr = self._fit(seg, settings, True, "miou")
                if i == 0:
                    result.add("seg_miou", fit.metrics["miou"], specs["seg_miou"])
                    result.add("seg_acc", fit.metrics["acc"], specs["seg_acc"])
                    result.add("seg_lr", lr, MetricSpec("lr", scale=1.0, fmt=".0e"))
                    result.artifacts.update(seg_pred=fit.examples["pred"], seg_val=val,
                                            per_class_iou=fit.metrics["iou_per_class"], num_classes=ev.num_classes)
                    result.curves["seg_loss"] = fit.history["step_loss"]
                else:
                    result.add(f"seg_miou_{res}px", fit.metrics["miou"], specs[f"seg_miou_{res}px"])
        if "depth" in benchmark.tasks:
            ev = benchmark.eval
            train, val = features(probe.depth_resolution)
            fit, lr = self._fit(lambda s: train_depth_probe(train, val, ev.min_depth, ev.max_depth, s,
                                                            f"{label} depth"), settings, False, "rmse")
            for k in ("rmse", "absrel", "delta1"):
                result.add(f"depth_{k}", fit.metrics[k], specs[f"depth_{k}"])
            result.add("depth_lr", lr, MetricSpec("lr", scale=1.0, fmt=".0e"))
            result.artifacts.update(depth_pred=fit.examples["pred"], depth_val=val)
            result.curves["depth_loss"] = fit.history["step_loss"]
        return result

    def figures(self, results: list[EvalResult], out_dir: Path) -> list[Path]:
        from versavit.eval import report

        path = out_dir / f"{results[0].benchmark}.png" if results else out_dir / "none.png"
        files: list[Path] = []
        first = results[0].artifacts if results else {}
        val = first.get("depth_val")
        if val is not None and val.images is not None and len(val.images):
            k = len(val.images)
            preds = {f"{r.backbone} probe": r.artifacts["depth_pred"] for r in results if "depth_pred" in r.artifacts}
            files.append(report.depth_figure(path.with_name(f"probe_depth_{path.stem}.png"), list(val.images),
                                             list(val.targets["depth"][:k]), list(val.targets["valid"][:k]), preds,
                                             f"{results[0].benchmark}: depth (linear probe)"))
        val = first.get("seg_val")
        if val is not None and val.images is not None and len(val.images):
            k = len(val.images)
            preds = {f"{r.backbone} probe": r.artifacts["seg_pred"] for r in results if "seg_pred" in r.artifacts}
            num_classes = int(first["num_classes"])
            files.append(report.seg_figure(path.with_name(f"probe_seg_{path.stem}.png"), list(val.images),
                                           list(val.targets["seg"][:k]), preds, num_classes,
                                           f"{results[0].benchmark}: semantic segmentation (linear probe)"))
        curves = {f"{task} probe loss": {r.backbone: r.curves[f"{task}_loss"] for r in results
                                         if f"{task}_loss" in r.curves} for task in ("seg", "depth")}
        curves = {k: v for k, v in curves.items() if v}
        if curves:
            files.append(report.curves_figure(path.with_name(f"probe_loss_{path.stem}.png"), curves,
                                              f"{results[0].benchmark}: linear-probe training loss (same seed "
                                              "and schedule)"))
        return files

    def protocol_note(self) -> str:
        p, s = self.ctx.cfg.eval.probe, self.probe_settings
        head = s.depth_head if s.depth_head == "linear" else f"binned ({s.depth_bins} bins, {s.depth_bins_space})"
        lr = f"best of lr {p.lr_grid} on the evaluation split" if p.lr_grid else f"lr {s.lr}"
        res = ", ".join(str(r) for r in [p.seg_resolution, *p.extra_seg_resolutions])
        return (f"Linear probes: frozen final-layer patch features, BatchNorm + 1x1 conv, {s.epochs} epochs, AdamW "
                f"{lr} (cosine), batch {s.batch_size}, seed {s.seed}; segmentation at {res} px, depth at "
                f"{p.depth_resolution} px ({head} head); images and labels resized to R x R, metrics at R x R.")

    def settings(self) -> dict[str, Any]:
        return {**self.probe_settings.__dict__, **self.ctx.cfg.eval.probe.model_dump()}
