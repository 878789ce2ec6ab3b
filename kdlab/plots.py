"""PNG figures people look at: reliability diagrams and result tables (matplotlib, headless)."""

from __future__ import annotations

import io
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
    """Render a results table as an image (the same cells as the markdown)."""
    height = 0.9 + 0.38 * (len(rows) + 1) + (0.4 if footer else 0)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.45 * len(header)), height))
    ax.axis("off")
    table = ax.table(cellText=[list(r) for r in rows], colLabels=list(header), loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1.0, 1.35)
    for (row, _), cell in table.get_celld().items():
        if row == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#e8e8f0")
    if title:
        ax.set_title(title, fontsize=11, weight="bold")
    if footer:
        fig.text(0.01, 0.01, footer, fontsize=7, color="#444444", wrap=True)
    _save(fig, path)
