"""Top-k accuracy, the per-epoch metrics log (CSV and JSONL), curves (PNG) and result tables."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """How many samples have their target among the top-k logits, for each k (k is capped at #classes)."""
    if targets.dim() == 2:  # soft targets (mixup/cutmix): score against the dominant class
        targets = targets.argmax(dim=1)
    kmax = min(max(ks), logits.shape[1])
    pred = logits.topk(kmax, dim=1).indices  # B, kmax
    hit = pred.eq(targets[:, None])
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


class MetricsLog:
    """One row per epoch in ``metrics.csv`` and ``metrics.jsonl`` (the CSV header grows with new columns)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.csv_path = self.folder / "metrics.csv"
        self.jsonl_path = self.folder / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        if self.jsonl_path.is_file():
            with self.jsonl_path.open(encoding="utf-8") as f:
                self.rows = [json.loads(line) for line in f if line.strip()]

    def truncate(self, last_epoch: int) -> None:
        """Keep rows up to ``last_epoch`` (resume: drop rows of an epoch whose checkpoint was never written)."""
        self.rows = [r for r in self.rows if r.get("epoch", -1) <= last_epoch]
        self._write_all()

    def append(self, row: Mapping[str, Any]) -> None:
        self.rows.append(dict(row))
        self._write_all()

    def _write_all(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        tmp = self.jsonl_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows), encoding="utf-8")
        os.replace(tmp, self.jsonl_path)
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.csv_path)


def plot_curves(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Loss, top-1 and learning rate per epoch as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] + 1 for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for key, label in (("train_loss", "train"), ("val_loss", "val"), ("ema_val_loss", "val (EMA)")):
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            axes[0].plot(epochs, [math.nan if y is None else y for y in ys], marker=".", label=label)
    axes[0].set_title("loss")
    for key, label in (("train_top1", "train"), ("val_top1", "val"), ("ema_val_top1", "val (EMA)")):
        ys = [r.get(key) for r in rows]
        if any(y is not None for y in ys):
            axes[1].plot(epochs, [math.nan if y is None else y for y in ys], marker=".", label=label)
    axes[1].set_title("top-1 accuracy (%)")
    axes[2].plot(epochs, [r.get("lr", math.nan) for r in rows], marker=".")
    axes[2].set_title("learning rate (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table; ``columns`` are ``(key, header, format spec)``."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], spec)) for k, _, spec in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
