"""Charts: top-1 against latency with the Pareto front, and latency against input size.

matplotlib is imported lazily with the non-interactive Agg backend (it is in the ``bench`` extra).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .pareto import pareto_front


def _plt():
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("charts need matplotlib: pip install 'effivit[bench]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_MARKERS = "os^Dv<>p*h"


def _plain_log_ticks(axis) -> None:
    """Log-scale ticks labelled 20, 50, 100 rather than 2x10^1."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def plot_front(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Published top-1 vs median latency (log x), one series per backend/impl, the front drawn per series.

    Models without a published top-1 (e.g. research variants) are shown as ticks under the axis.
    """
    plt = _plt()
    ok = [r for r in rows if r.get("status") == "ok" and r.get("median_ms")]
    series: dict[str, list[dict[str, Any]]] = {}
    for r in ok:
        key = r["backend"] if r.get("impl", "effivit") == "effivit" else f"{r['backend']} ({r['impl']})"
        series.setdefault(key, []).append(r)
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    tops = [r["top1"] for r in ok if r.get("top1") is not None]
    floor = (min(tops) - 1.5) if tops else 0.0
    for i, (key, pts) in enumerate(sorted(series.items())):
        mk = _MARKERS[i % len(_MARKERS)]
        with_acc = [r for r in pts if r.get("top1") is not None]
        on = pareto_front([r["median_ms"] for r in with_acc], [r["top1"] for r in with_acc])
        sc = ax.scatter([r["median_ms"] for r in with_acc], [r["top1"] for r in with_acc], marker=mk, s=40,
                        label=key, zorder=3)
        color = sc.get_facecolor()[0] if len(with_acc) else None
        front = sorted((r for r, o in zip(with_acc, on) if o), key=lambda r: r["median_ms"])
        if front:
            ax.step([r["median_ms"] for r in front], [r["top1"] for r in front], where="post", color=color,
                    alpha=0.6, lw=1.5, zorder=2)
        placed: list[tuple[float, float]] = []
        for r, o in sorted(zip(with_acc, on), key=lambda p: p[0]["median_ms"]):
            t, a = r["median_ms"], r["top1"]
            # A neighbour within ~25% in latency and 0.8 points of top-1 already has its label above.
            crowded = sum(1 for pt, pa in placed if abs(math.log(t / pt)) < 0.22 and abs(a - pa) < 0.8)
            placed.append((t, a))
            ax.annotate(r["label"] + (" *" if o else ""), (t, a), fontsize=7,
                        xytext=(4, 3 - 11 * crowded), textcoords="offset points")
        no_acc = sorted((r for r in pts if r.get("top1") is None), key=lambda r: r["median_ms"])
        for j, r in enumerate(no_acc):
            ax.scatter([r["median_ms"]], [floor], marker="|", s=150, color=color, zorder=3)
            # Stagger the labels so neighbouring ticks stay readable.
            ax.annotate(r["label"], (r["median_ms"], floor), fontsize=7, xytext=(3, 6 + 9 * (j % 3)),
                        textcoords="offset points")
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.set_xlabel("median latency (ms, log scale)")
    ax.set_ylabel("published ImageNet-1K top-1 (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title or "top-1 vs latency (* = on the Pareto front; | = no published top-1)", fontsize=10)
    if series:
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_resolution(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Median latency against input size (log-log), one line per model/backend.

    On log-log axes a token mixer quadratic in tokens (N = (H/s)^2) bends towards slope 4 against the side
    length; a linear one stays at slope 2 (the slope of the convolutions).
    """
    plt = _plt()
    lines: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("median_ms"):
            key = r["label"] + ("" if len({x["backend"] for x in rows}) == 1 else f" [{r['backend']}]")
            lines.setdefault(key, []).append((r["img_size"], r["median_ms"]))
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    sizes: set[int] = set()
    for i, (key, pts) in enumerate(sorted(lines.items())):
        pts.sort()
        sizes.update(p[0] for p in pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=_MARKERS[i % len(_MARKERS)], label=key)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    if sizes:
        ax.set_xticks(sorted(sizes))
        ax.set_xticklabels([str(s) for s in sorted(sizes)])
        ax.minorticks_off()
    ax.set_xlabel("input size (px, square)")
    ax.set_ylabel("median latency (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title or "latency vs input size", fontsize=10)
    if lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
