"""The evaluation report: comparison tables (markdown + JSON) and figures (PNG).

One table per evaluator, in the shape of the paper's table it reproduces: rows are backbones (Table 3: Qwen2-VL
ViT vs VersaViT; Table 4: one row per task subset of the ablation), then the paper's own numbers for the same
columns as reference rows (versavit.eval.paper); columns are `<evaluator>/<benchmark>/<metric>`; every backbone
row after the reference shows its delta to the reference in parentheses. One unit convention for every figure a
person reads (this report, MLflow, `versavit compare`): mIoU, accuracies, cIoU, recall, AbsRel and delta1 in
percent, RMSE in metres (as in the paper; `display_value`); comparison.json keeps raw fractions for programs and
says so (`units`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from versavit.eval.results import EvalResult, ReportedEvaluator

BENCHMARK_LABELS = {"synthetic": "Synthetic", "ade20k": "ADE20k", "voc": "VOC", "cityscapes": "Cityscapes",
                    "nyu": "NYUv2", "kitti": "KITTI", "refcoco": "RefCOCO val", "refcoco+": "RefCOCO+ val",
                    "refcocog": "RefCOCOg val", "refcoco-testA": "RefCOCO testA", "refcoco-testB": "RefCOCO testB",
                    "refcoco+-testA": "RefCOCO+ testA", "refcoco+-testB": "RefCOCO+ testB",
                    "refcocog-test": "RefCOCOg test", "da2k": "DA-2K", "navi": "NAVI", "spair": "SPair-71k",
                    "coco-karpathy": "COCO", "mmbench": "MMBench", "mmstar": "MMStar", "mmmu": "MMMU",
                    "mathvista": "MathVista", "hallusionbench": "HallusionBench", "ai2d": "AI2D",
                    "ocrbench": "OCRBench", "mmvet": "MM-Vet"}


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


UNITS = "mIoU, accuracies, cIoU, recall, AbsRel and δ1 in %, RMSE in metres"


def display_value(column: Mapping[str, Any], value: float) -> float:
    """A raw value (fraction, metres) of a table column in the units every person-facing figure uses: the
    report's, MLflow's, `versavit compare`'s (UNITS; the column's scale)."""
    return float(value) * float(column.get("scale", 1.0))


def _rounded(column: Mapping[str, Any], value: float) -> float:
    """A display value to one digit more than the report prints (a runs table shows every digit it gets)."""
    digits = int(str(column.get("fmt", ".5f")).strip(".fe")) + 1
    return round(display_value(column, value), digits)


def headline_metrics(table: Mapping[str, Any]) -> dict[str, float]:
    """The comparison's headline figures for the pipeline's parent run, so the runs table compares experiments:
    for every column of the table (`<evaluator>/<benchmark>/<metric>`, e.g. `linear-probe/synthetic/seg_miou`), in
    display units, rounded one digit past the report's:

    - the trained backbone's value as the column's key itself, its delta to the reference as `<key>/delta`, and
      the reference's (baseline's) as `<key>/baseline`: each metric's three side by side in MLflow's runs table,
      which orders columns by name; the trained values come first in the dict (the compare page charts the
      first metric a run logged);
    - with several trained backbones (the ablation's, the recipes'), `<key>/<backbone>` and `<key>/<backbone>/delta`
      for each instead.
    """
    trained: dict[str, float] = {}
    deltas: dict[str, float] = {}
    reference_values: dict[str, float] = {}
    reference = table.get("reference")
    others = [n for n in table.get("backbones", []) if n != reference]
    for section in table.get("sections", []):
        for column in section["columns"]:
            key = column["key"]
            if _finite(value := section["rows"].get(reference, {}).get(key)):
                reference_values[f"{key}/{reference}"] = _rounded(column, value)
            for name in others:
                at = key if len(others) == 1 else f"{key}/{name}"
                if _finite(value := section["rows"][name].get(key)):
                    trained[at] = _rounded(column, value)
                if _finite(delta := section["deltas"].get(name, {}).get(key)):
                    deltas[f"{at}/delta"] = _rounded(column, delta)
    # logged in this order: MLflow's compare page charts the first metric a run has, which should differ by run
    return {**trained, **deltas, **reference_values}


def backbone_figures(table: Mapping[str, Any], name: str) -> dict[str, float]:
    """One backbone's figures in display units: `<evaluator>/<benchmark>/<metric>` and, for a backbone other than
    the reference, `delta/<evaluator>/<benchmark>/<metric>` (what its model version is tagged with)."""
    out: dict[str, float] = {}
    for section in table.get("sections", []):
        for column in section["columns"]:
            key = column["key"]
            if _finite(value := section["rows"].get(name, {}).get(key)):
                out[key] = _rounded(column, value)
            if _finite(delta := section["deltas"].get(name, {}).get(key)):
                out[f"delta/{key}"] = _rounded(column, delta)
    return out


def comparison_table(results: Sequence[EvalResult], reference: str, backbones: Sequence[str],
                     evaluators: Sequence[ReportedEvaluator], benchmarks: Sequence[str]) -> dict[str, Any]:
    """Every backbone's results -> one section per evaluator (in the given order): columns `<evaluator>/
    <benchmark>/<metric>` (benchmarks in the given order, metrics in the evaluator's column order), rows of raw
    values per backbone, deltas to `reference`, and the paper's numbers for the same columns (display units)."""
    from versavit.eval.paper import paper_value

    by = {(r.evaluator, r.benchmark, r.backbone): r for r in results}
    names = list(backbones)
    sections = []
    for ev in evaluators:
        specs = ev.columns()
        headline = next(iter(specs), "")
        columns = []
        for bench in benchmarks:
            for metric, spec in specs.items():
                values = [by[(ev.name, bench, n)].value(metric) for n in names if (ev.name, bench, n) in by]
                if any(_finite(v) for v in values):
                    columns.append({"key": f"{ev.name}/{bench}/{metric}", "evaluator": ev.name, "benchmark": bench,
                                    "metric": metric, "label": f"{BENCHMARK_LABELS.get(bench, bench)} {spec.label}",
                                    "higher_is_better": spec.higher_is_better, "scale": spec.scale, "fmt": spec.fmt,
                                    "paper": paper_value(ev.name, bench, metric, headline)})
        if not columns:
            continue
        rows = {n: {c["key"]: (by[(ev.name, c["benchmark"], n)].value(c["metric"])
                               if (ev.name, c["benchmark"], n) in by else None) for c in columns} for n in names}
        deltas = {n: {k: (v - rows[reference][k]) if _finite(v) and _finite(rows[reference].get(k)) else None
                      for k, v in rows[n].items()} for n in names if n != reference}
        paper_rows: dict[str, dict[str, float]] = {}
        for c in columns:
            for row, value in c["paper"].items():
                paper_rows.setdefault(row, {})[c["key"]] = value
        sections.append({"key": ev.name, "title": ev.title, "columns": columns, "rows": rows, "deltas": deltas,
                         "paper": paper_rows})
    return {"reference": reference, "backbones": names, "sections": sections}


def _cell(column: Mapping[str, Any], value: Any, delta: Any = None) -> str:
    if not _finite(value):
        return "–"
    scale, fmt = column["scale"], column["fmt"]
    text = format(value * scale, fmt)
    if _finite(delta):
        text += f" ({delta * scale:+{fmt}})"
    return text


def to_markdown(table: Mapping[str, Any], sources: Mapping[str, str], title: str, notes: Sequence[str] = ()) -> str:
    """The comparison as markdown: one table per section, backbones listed with where they came from."""
    lines = [f"# {title}", ""]
    lines += [f"- **{name}**: {sources.get(name, '')}" for name in table["backbones"]]
    lines += ["", f"Deltas in parentheses are against **{table['reference']}**; ↑ higher is better, ↓ lower is better. "
              f"{UNITS}. Rows in italics: the paper's numbers.", ""]
    for section in table["sections"]:
        cols = section["columns"]
        lines += [f"## {section['title']}", ""]
        lines.append("| backbone | " + " | ".join(f"{c['label']} {'↑' if c['higher_is_better'] else '↓'}"
                                                 for c in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for name in table["backbones"]:
            deltas = section["deltas"].get(name, {})
            cells = [_cell(c, section["rows"][name][c["key"]], deltas.get(c["key"])) for c in cols]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        for row, values in section.get("paper", {}).items():  # the paper's numbers, as printed
            cells = [f"{values[c['key']]:g}" if c["key"] in values else "" for c in cols]
            lines.append(f"| *{row}* | " + " | ".join(cells) + " |")
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def write_tables(out_dir: Path, table: Mapping[str, Any], results: Mapping[str, Any], sources: Mapping[str, str],
                 title: str, notes: Sequence[str] = ()) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "comparison.md"
    md.write_text(to_markdown(table, sources, title, notes))
    js = out_dir / "comparison.json"
    units = {"values": "raw fractions (RMSE in metres); displayed: " + UNITS + "; paper rows as printed",
             "scale": {c["key"]: c["scale"] for sec in table["sections"] for c in sec["columns"]}}
    js.write_text(json.dumps({"table": table, **results, "units": units}, indent=1, default=_json_default))
    return [md, js]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


# ------------------------------------------------------------------------------------------------
# figures (matplotlib, headless)


def _plt():  # noqa: ANN202 - matplotlib's pyplot module
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def palette(n: int) -> np.ndarray:
    """n distinct, reproducible RGB colours (uint8)."""
    base = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128],
                     [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195],
                     [128, 128, 0], [255, 215, 180], [0, 0, 128], [128, 128, 128]], np.uint8)
    if n <= len(base):
        return base[:n]
    extra = np.random.default_rng(0).integers(0, 256, (n - len(base), 3), dtype=np.uint8)
    return np.concatenate([base, extra])


def overlay(image: np.ndarray, labels: np.ndarray, num_classes: int, ignore_index: int = 255,
            alpha: float = 0.55) -> np.ndarray:
    """Class colours blended over the image; ignored pixels keep the image."""
    colours = palette(num_classes)
    out = image.astype(np.float32).copy()
    keep = labels != ignore_index
    out[keep] = (1 - alpha) * out[keep] + alpha * colours[np.clip(labels[keep], 0, num_classes - 1)]
    return out.round().astype(np.uint8)


def mask_overlay(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (255, 40, 40),
                 alpha: float = 0.55) -> np.ndarray:
    out = image.astype(np.float32).copy()
    out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(colour, np.float32)
    return out.round().astype(np.uint8)


def _resize_rgb(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == shape:
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((shape[1], shape[0]), Image.BILINEAR))


def _grid(rows: list[list[tuple[str, np.ndarray, dict]]], path: Path, suptitle: str, cell: float = 2.4) -> Path:
    """rows of (title, array, imshow kwargs) panels -> one PNG."""
    plt = _plt()
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols, cell * n_rows + 0.4), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(row):
                title, array, kwargs = row[c]
                ax.imshow(array, **kwargs)
                ax.set_title(title, fontsize=8)
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # room for the suptitle
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def depth_figure(path: Path, images: Sequence[np.ndarray], gts: Sequence[np.ndarray], valids: Sequence[np.ndarray],
                 preds: Mapping[str, Sequence[np.ndarray]], title: str) -> Path:
    """Per example: input, ground-truth depth, then each prediction (same colour range as the ground truth)."""
    rows = []
    for i, (image, gt, valid) in enumerate(zip(images, gts, valids, strict=False)):
        vmin, vmax = (float(gt[valid].min()), float(gt[valid].max())) if valid.any() else (0.0, 1.0)
        style = {"cmap": "magma_r", "vmin": vmin, "vmax": vmax}
        row = [("input", _resize_rgb(image, gt.shape), {}),
               ("ground truth (m)", np.ma.masked_where(~valid, gt), style)]
        for name, maps in preds.items():
            if i < len(maps):
                row.append((name, maps[i], style))
        rows.append(row)
    return _grid(rows, path, title)


def seg_figure(path: Path, images: Sequence[np.ndarray], gts: Sequence[np.ndarray],
               preds: Mapping[str, Sequence[np.ndarray]], num_classes: int, title: str) -> Path:
    """Per example: input, ground-truth overlay, each backbone's probe prediction as an overlay."""
    rows = []
    for i, (image, gt) in enumerate(zip(images, gts, strict=False)):
        image = _resize_rgb(image, gt.shape)
        row = [("input", image, {}), ("ground truth", overlay(image, gt, num_classes), {})]
        for name, maps in preds.items():
            if i < len(maps):
                row.append((name, overlay(image, maps[i], num_classes), {}))
        rows.append(row)
    return _grid(rows, path, title)


def refseg_figure(path: Path, examples: Mapping[str, Mapping[str, Sequence[Any]]], title: str) -> Path:
    """Per backbone and query: ground-truth mask (green) and prediction (red), expression and IoU as titles."""
    rows = []
    for name, ex in examples.items():
        row = []
        for image, gt, pred, sentence, iou in zip(ex["image"], ex["gt"], ex["pred"], ex["sentence"], ex["iou"],
                                                  strict=False):
            image = _resize_rgb(np.asarray(image), np.asarray(gt).shape)
            both = mask_overlay(mask_overlay(image, np.asarray(gt), (40, 200, 40), 0.45), np.asarray(pred),
                                (255, 40, 40), 0.45)
            text = sentence if len(sentence) <= 36 else sentence[:33] + "..."
            row.append((f"{name}: {text}\nIoU {iou:.2f}", both, {}))
        if row:
            rows.append(row)
    return _grid(rows, path, title + " (green: truth, red: prediction)", cell=2.8)


def curves_figure(path: Path, curves: Mapping[str, Mapping[str, Sequence[float]]], title: str,
                  xlabel: str = "step", smooth: int = 1) -> Path:
    """One panel per group (e.g. a probe task), one line per series (e.g. a backbone)."""
    plt = _plt()
    groups = [g for g, series in curves.items() if any(len(v) for v in series.values())]
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(4.2 * max(1, len(groups)), 3.2), squeeze=False)
    for ax, group in zip(axes[0], groups, strict=False):
        for name, values in curves[group].items():
            v = np.asarray(values, dtype=float)
            if v.size == 0:
                continue
            if smooth > 1 and v.size > smooth:
                v = np.convolve(v, np.ones(smooth) / smooth, mode="valid")
            ax.plot(np.arange(1, v.size + 1), v, label=name, linewidth=1.2)
        ax.set_title(group, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def training_curves(files: Mapping[str, Path], out: Path) -> Path | None:
    """Training loss curves from metrics.jsonl files of training runs (label -> path; missing files are
    skipped): one panel per loss (caption, depth, refseg, total), one line per run."""
    curves: dict[str, dict[str, list[float]]] = {}
    for label, path in files.items():
        if not Path(path).is_file():
            continue
        by_step: dict[int, dict] = {}
        for line in Path(path).read_text().splitlines():
            if line.strip():
                point = json.loads(line)
                by_step[int(point.get("step", 0))] = point  # a resumed run re-logs steps: the last record wins
        for step in sorted(by_step):
            for k, v in by_step[step].items():
                if k.startswith("loss/") and _finite(v):
                    curves.setdefault(f"{k.removeprefix('loss/')} loss", {}).setdefault(label, []).append(float(v))
    if not curves:
        return None
    return curves_figure(out, curves, "training losses (reports/<stage>/metrics.jsonl)")
