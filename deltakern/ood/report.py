"""Writing an :class:`~deltakern.ood.evaluation.Evaluation` to disk: metrics.json, metrics.csv,
report.md and PNG plots (score histograms, ROC curves, the effect of c on ΔEnergy).

Every file is written atomically (a temporary file in the target directory, then
``os.replace``), so an interrupted run never leaves a half-written report. matplotlib is
imported only when plots are drawn, through its object-oriented API (no global pyplot state).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltakern import metrics
from deltakern.data.atomic import write_bytes, write_text
from deltakern.ood.evaluation import MEAN_SET, Evaluation, score_label

CSV_COLUMNS = (
    "score", "ood_set", "auroc", "fpr95", "aupr_in", "aupr_out", "fpr95_ood_positive", "threshold", "n_id", "n_ood",
)
ROC_DRAW_POINTS = 4000  # points drawn per ROC curve (drawing only; metrics use the full curve)
HIST_BINS = 100


def safe_name(name: str) -> str:
    """A file-name-safe version of a score or set name."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_") or "set"


def _jsonable(value: Any) -> Any:
    """Plain JSON: non-finite floats become strings ("inf"), tensors/arrays become lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def metrics_json(evaluation: Evaluation, meta: dict[str, Any] | None = None) -> str:
    """The JSON document of metrics.json: ``meta`` (versions, settings, inputs) + every number."""
    doc = dict(meta or {})
    doc.update(evaluation.to_dict())
    return json.dumps(_jsonable(doc), indent=2, ensure_ascii=False) + "\n"


def metrics_csv(evaluation: Evaluation) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in evaluation.records():
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in record.items()})
    return buffer.getvalue()


def report_markdown(evaluation: Evaluation, meta: dict[str, Any] | None = None, plots: list[str] | None = None) -> str:
    """report.md: settings, inputs, the main table, the c-effect table, conventions, plots."""
    meta = meta or {}
    lines = ["# deltakern evaluation", ""]
    if meta.get("deltakern"):
        lines += [f"deltakern {meta['deltakern']}, torch {meta.get('torch', '?')}", ""]
    settings = meta.get("settings") or {}
    if settings:
        lines += ["Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()), ""]
    inputs = meta.get("inputs") or {}
    if inputs:
        lines += ["| input | source | shape | sha256 |", "|---|---|---|---|"]
        for name, info in inputs.items():
            shape = "×".join(str(s) for s in info.get("shape", []))
            digest = str(info.get("sha256", ""))[:16]
            lines.append(f"| {name} | `{info.get('path', info.get('source', ''))}` | {shape} | `{digest}` |")
        lines.append("")
    lines += ["## ID vs OOD", "", "Percentages; ↑ higher is better, ↓ lower is better.", ""]
    lines += [evaluation.table(tablefmt="github", accuracy=False), ""]
    if evaluation.id_accuracy is not None:
        lines += [f"ID top-1 accuracy: **{100 * evaluation.id_accuracy:.2f}%**", ""]
    c_table = evaluation.c_table(tablefmt="github")
    if c_table:
        lines += ["## ΔEnergy: effect of c", "", f"Mean over the OOD sets ({MEAN_SET}), one scoring pass.", "", c_table, ""]
    lines += ["## Conventions", ""]
    lines += [f"- **{key}**: {text}" for key, text in evaluation.to_dict()["conventions"].items()]
    lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# plots


def _figure(width: float = 6.4, height: float = 4.2):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save_png(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return write_bytes(path, buffer.getvalue())


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def plot_histograms(evaluation: Evaluation, out_dir: Path) -> list[Path]:
    """One PNG per score: density histograms of the ID set and of each OOD set."""
    written = []
    for score in evaluation.main_scores():
        series = {"ID": _numpy(evaluation.id_scores[score])}
        for set_name in evaluation.ood_sets:
            series[f"OOD: {set_name}"] = _numpy(evaluation.ood_scores[set_name][score])
        finite = np.concatenate([v[np.isfinite(v)] for v in series.values()])
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if low == high:
            low, high = low - 0.5, high + 0.5
        bins = np.linspace(low, high, HIST_BINS + 1)
        fig = _figure()
        ax = fig.add_subplot()
        for label, values in series.items():
            ax.hist(values, bins=bins, density=True, histtype="step" if label != "ID" else "stepfilled",
                    alpha=0.45 if label == "ID" else 1.0, linewidth=1.4, label=f"{label} (n={values.size:,})")
        ax.set_xlabel(f"{score_label(score)} (higher = ID)")
        ax.set_ylabel("density")
        ax.set_title(f"{score_label(score)}: ID vs OOD")
        ax.legend(fontsize="small")
        written.append(_save_png(fig, out_dir / f"hist_{safe_name(score)}.png"))
    return written


def plot_roc(evaluation: Evaluation, out_dir: Path) -> list[Path]:
    """One PNG per OOD set: the ROC curve (ID positive) of every score, AUROC in the legend."""
    written = []
    used: set[str] = set()
    for set_name in evaluation.ood_sets:
        stem = safe_name(set_name)
        stem = stem if stem not in used else f"{stem}_{len(used)}"  # "a b" and "a_b" both exist
        used.add(stem)
        fig = _figure(5.2, 5.0)
        ax = fig.add_subplot()
        for score in evaluation.main_scores():
            fpr, tpr, _ = metrics.roc_curve(evaluation.id_scores[score], evaluation.ood_scores[set_name][score])
            fpr, tpr = fpr.cpu().numpy(), tpr.cpu().numpy()
            if fpr.size > ROC_DRAW_POINTS:  # drawing only: a few thousand points look identical
                keep = np.unique(np.linspace(0, fpr.size - 1, ROC_DRAW_POINTS).round().astype(np.int64))
                fpr, tpr = fpr[keep], tpr[keep]
            auc = evaluation.result(score, set_name)["auroc"]
            ax.plot(fpr, tpr, linewidth=1.3, label=f"{score_label(score)} (AUROC {100 * auc:.2f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
        ax.axhline(evaluation.tpr, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("FPR (fraction of OOD accepted)")
        ax.set_ylabel("TPR (fraction of ID accepted)")
        ax.set_title(f"ROC, ID vs {set_name}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.005)
        ax.legend(fontsize="small", loc="lower right")
        written.append(_save_png(fig, out_dir / f"roc_{stem}.png"))
    return written


def plot_c_effect(evaluation: Evaluation, out_dir: Path) -> list[Path]:
    """AUROC and FPR95 (mean over the OOD sets) of ΔEnergy against c, both modes."""
    rows = evaluation.c_table_rows()
    if not rows:
        return []
    fig = _figure(8.0, 3.6)
    ax_auc, ax_fpr = fig.subplots(1, 2)
    for mode in dict.fromkeys(r[0] for r in rows):
        cs = [r[1] for r in rows if r[0] == mode]
        ax_auc.plot(cs, [r[2] for r in rows if r[0] == mode], marker="o", label=mode)
        ax_fpr.plot(cs, [r[3] for r in rows if r[0] == mode], marker="o", label=mode)
    ax_auc.set_ylabel("AUROC (%) ↑")
    ax_fpr.set_ylabel(f"{evaluation.fpr_label()} (%)")
    for ax in (ax_auc, ax_fpr):
        ax.set_xlabel("c (top-c logits reset)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize="small")
    return [_save_png(fig, out_dir / "c_effect.png")]


def write_report(
    evaluation: Evaluation, out_dir: str | os.PathLike, meta: dict[str, Any] | None = None, *, plots: bool = True
) -> dict[str, Any]:
    """Write metrics.json, metrics.csv, report.md and (with ``plots``) PNGs into ``out_dir``.

    Returns ``{"files": [paths], "plots_skipped": reason or None}``. Without matplotlib the
    plots are skipped (and the reason recorded) rather than failing the whole report.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs: list[Path] = []
    skipped = None if plots else "disabled"
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            skipped = "matplotlib is not installed (pip install matplotlib)"
        else:
            pngs = plot_histograms(evaluation, out) + plot_roc(evaluation, out) + plot_c_effect(evaluation, out)
    meta = dict(meta or {})
    meta["plots"] = [p.name for p in pngs] if skipped is None else f"skipped: {skipped}"
    files = [
        write_text(out / "metrics.json", metrics_json(evaluation, meta)),
        write_text(out / "metrics.csv", metrics_csv(evaluation)),
        write_text(out / "report.md", report_markdown(evaluation, meta, [p.name for p in pngs])),
    ]
    return {"files": [str(p) for p in files + pngs], "plots_skipped": skipped}
