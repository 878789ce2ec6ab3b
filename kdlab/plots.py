"""PNG figures people look at: reliability diagrams and result tables (matplotlib, headless)."""

from __future__ import annotations

import csv
import io
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from kdlab.files import atomic_write_bytes


def _save(fig: plt.Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def reliability_bins(
    probs: torch.Tensor, targets: torch.Tensor, bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per confidence bin: mean confidence, accuracy and sample count (the ECE's ingredients)."""
    confidence, prediction = probs.max(-1)
    correct = (prediction == targets).double()
    index = torch.clamp((confidence * bins).long(), max=bins - 1)
    count = torch.bincount(index, minlength=bins).double()
    conf_sum = torch.bincount(index, weights=confidence.double(), minlength=bins)
    acc_sum = torch.bincount(index, weights=correct, minlength=bins)
    safe = count.clamp(min=1)
    return conf_sum / safe, acc_sum / safe, count


def reliability_diagram(
    curves: Sequence[tuple[str, torch.Tensor, float]],
    targets: torch.Tensor,
    path: Path,
    bins: int = 15,
    title: str = "",
) -> None:
    """One panel per (label, probabilities, ECE%): accuracy per confidence bin against the diagonal."""
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 4.2), squeeze=False)
    edges = torch.linspace(0, 1, bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    for ax, (label, probs, ece) in zip(axes[0], curves, strict=True):
        _, accuracy, count = reliability_bins(probs, targets, bins)
        shown = count > 0
        ax.bar(
            centers[shown],
            accuracy[shown],
            width=1 / bins,
            edgecolor="black",
            color="#4c72b0",
            label="accuracy",
        )
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1),
            xlabel="confidence",
            ylabel="accuracy",
            title=f"{label}  (ECE {ece:.2f}%)",
        )
        ax.legend(loc="upper left")
    if title:
        fig.suptitle(title)
    _save(fig, path)


def table_figure(
    header: Sequence[str], rows: Sequence[Sequence[str]], path: Path, title: str = "", footer: str = ""
) -> None:
    """Render a results table as an image (the same cells as the markdown), columns sized to fit."""
    cells = [list(header), *(list(r) for r in rows)]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(header))]
    width_inches = max(6.0, 0.085 * sum(widths) + 0.3 * len(widths))
    notes = textwrap.fill(footer, width=int(width_inches * 15)) if footer else ""
    table_height = 0.3 * len(cells)
    notes_height = 0.16 * (notes.count("\n") + 1) if notes else 0.0
    fig = plt.figure(figsize=(width_inches, table_height + notes_height + 0.6))
    ax = fig.add_axes((0.0, notes_height / fig.get_figheight(), 1.0, table_height / fig.get_figheight()))
    ax.axis("off")
    total = sum(widths)
    table = ax.table(
        cellText=cells[1:],
        colLabels=cells[0],
        colWidths=[w / total for w in widths],
        loc="center",
        cellLoc="center",
        bbox=(0.0, 0.0, 1.0, 1.0),
    )
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    for (row, column), cell in table.get_celld().items():
        if row == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#e8e8f0")
        elif column == 0:
            cell.set_text_props(ha="left")
            cell.PAD = 0.02
    if title:
        fig.suptitle(title, fontsize=11, weight="bold", y=1 - 0.05 / fig.get_figheight())
    if notes:
        fig.text(0.005, 0.005, notes, fontsize=7, color="#444444", va="bottom")
    _save(fig, path)


def agreement_heatmap(matrix: torch.Tensor, labels: Sequence[str], path: Path) -> None:
    """A ``[K, K]`` matrix of fractions in [0, 1] (pairwise teacher agreement) as an annotated heat map."""
    fig, axis = plt.subplots(figsize=(1.2 + 0.6 * len(labels), 1.0 + 0.6 * len(labels)))
    image = axis.imshow(matrix.numpy(), vmin=min(0.5, float(matrix.min())), vmax=1.0, cmap="viridis")
    axis.set_xticks(range(len(labels)), labels)
    axis.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            axis.text(j, i, f"{float(matrix[i, j]):.2f}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(image, ax=axis, shrink=0.8)
    axis.set_title("top-1 agreement")
    _save(fig, path)


def training_curves(csv_files: Sequence[Path], path: Path, title: str = "") -> None:
    """Per-epoch training loss and validation top-1 from the CSV logs of every attempt of a run."""
    loss: dict[int, float] = {}
    top1: dict[int, float] = {}
    for csv_file in csv_files:
        with open(csv_file, newline="") as handle:
            for row in csv.DictReader(handle):
                epoch = int(float(row["epoch"])) if row.get("epoch") else None
                if epoch is None:
                    continue
                if row.get("train/loss"):
                    loss[epoch] = float(row["train/loss"])
                if row.get("val/top1"):
                    top1[epoch] = float(row["val/top1"])
    fig, left = plt.subplots(figsize=(6.4, 3.6))
    left.plot(sorted(loss), [loss[e] for e in sorted(loss)], color="#4c72b0", label="train loss")
    left.set(xlabel="epoch", ylabel="train loss (weighted sum)")
    if top1:
        right = left.twinx()
        right.plot(sorted(top1), [top1[e] for e in sorted(top1)], color="#dd8452", label="val top-1")
        right.set_ylabel("validation top-1 (%)")
        handles = left.get_lines() + right.get_lines()
        left.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize=8)
    if title:
        left.set_title(title, fontsize=10)
    _save(fig, path)


def delta_heatmap(
    values: Sequence[Sequence[float | None]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    path: Path,
    title: str,
    legend: str,
) -> None:
    """Signed differences (ours - published, or a method's gain over its student) as an annotated
    heat map centred on zero; cells without a value (not applicable, not run) are grey."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    matrix = np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float)
    bound = float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else 1.0
    bound = max(bound, 1e-6)
    fig, axis = plt.subplots(figsize=(2.5 + 1.1 * len(column_labels), 1.2 + 0.38 * len(row_labels)))
    cmap = plt.get_cmap("RdBu").copy()
    cmap.set_bad("#dddddd")
    image = axis.imshow(matrix, cmap=cmap, norm=TwoSlopeNorm(0.0, -bound, bound), aspect="auto")
    axis.set_xticks(range(len(column_labels)), column_labels, rotation=30, ha="right")
    axis.set_yticks(range(len(row_labels)), row_labels)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            value = matrix[i, j]
            text = "—" if np.isnan(value) else f"{value:+.2f}"
            dark = not np.isnan(value) and abs(value) > 0.6 * bound
            axis.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "#222222")
    fig.colorbar(image, ax=axis, shrink=0.8, label=legend)
    axis.set_title(title, fontsize=10)
    _save(fig, path)
