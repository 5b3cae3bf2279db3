"""The search report: ``report.md`` (architecture, predicted vs measured latency, slimming steps, the command
that trains the result), ``report.json`` (the same as data) and ``slimming.png`` (held-out top-1 of the
supernet path against predicted latency at each step)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_slimming(rows: Sequence[dict[str, Any]], path: str | Path, budget_ms: float, title: str = "") -> Path | None:
    """Held-out top-1 against predicted latency along the slimming path; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    xs = [r["pred_ms"] for r in rows]
    ys = [r["top1"] for r in rows]
    ax.plot(xs, ys, "-o", ms=3, color="tab:blue", label="supernet path (BN recalibrated)")
    for r in rows:
        if r["action"] != "start":
            ax.annotate({"drop": "d", "to4d": "4", "narrow": "n"}.get(r["action"], "?"), (r["pred_ms"], r["top1"]),
                        textcoords="offset points", xytext=(0, 4), ha="center", fontsize=6, color="0.3")
    ax.axvline(budget_ms, color="tab:red", ls="--", lw=1, label=f"budget {budget_ms:g} ms")
    ax.set_xlabel("predicted latency (ms)")
    ax.set_ylabel("held-out top-1 (%)")
    ax.invert_xaxis()  # slimming goes from the slowest network to the fastest: read it left to right
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", framealpha=0.7)
    ax.set_title(title or "latency-driven slimming (d: drop block, 4: MB3D->MB4D, n: narrow stage)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _stage_table(arch: dict[str, Any]) -> list[str]:
    lines = ["| stage | width | blocks | resolution |", "|---|---:|---|---:|"]
    size = arch["img_size"]
    for i, s in enumerate(arch["stages"]):
        n4 = s["blocks"].count("4d")
        n3 = s["blocks"].count("3d")
        blocks = ", ".join(p for p in (f"{n4} x MB4D" if n4 else "", f"{n3} x MB3D" if n3 else "") if p)
        r = size // 2 ** (i + 2)
        lines.append(f"| {i + 1} | {s['width']} | {blocks} | {r}x{r} |")
    return lines


def write_report(folder: str | Path, info: dict[str, Any]) -> Path:
    """Write ``report.md`` and ``report.json`` into ``folder`` from ``info`` (see ``command.py``)."""
    folder = Path(folder)
    rows = info["steps"]
    final = rows[-1]
    png = plot_slimming(rows, folder / "slimming.png", info["budget_ms"])
    err = 100.0 * (final["pred_ms"] - info["measured_ms"]) / info["measured_ms"]
    md = [
        f"# effivit search: {info['budget_ms']:g} ms budget",
        "",
        f"Command: `{info['command']}`",
        "",
        f"Machine: {info['machine']}. Latency: {info['runtime']} (table `{info['table']}`, "
        f"{info['table_entries']} entries, network/op-sum scale {info['table_scale']:.3f}).",
        "",
        "## Result",
        "",
        f"`{final['arch']}` ({info['arch_file']}): {final['params_m']:.3f}M parameters, predicted "
        f"**{final['pred_ms']:.3f} ms**, measured **{info['measured_ms']:.3f} ms** (prediction error "
        f"{err:+.1f}%, measured now in the table's runtime), held-out top-1 of the supernet path "
        f"{final['top1']:.2f}% (BatchNorm recalibrated; a trained network does better).",
        "",
        *_stage_table(info["arch"]),
        "",
        f"Start of slimming: `{rows[0]['arch']}`, predicted {rows[0]['pred_ms']:.3f} ms, {rows[0]['params_m']:.3f}M "
        f"parameters, held-out top-1 {rows[0]['top1']:.2f}%.",
        "",
        "## Slimming",
        "",
        f"Objective: {info['objective']} (the action with the smallest held-out top-1 drop per "
        f"{'ms saved' if info['objective'] == 'latency' else 'MES gained'}).",
        "",
        "| step | action | predicted ms | params (M) | MES | held-out top-1 % | candidates (top-1 drop / gain) |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        cands = "; ".join(f"{c['action']} {c['drop']:+.2f}/{c['gain']:.3g}" if "drop" in c else f"{c['action']} (no gain)"
                          for c in r["candidates"])
        md.append(f"| {r['step']} | {r['text']} | {r['pred_ms']:.3f} | {r['params_m']:.3f} | {r['mes']:.1f} | "
                  f"{r['top1']:.2f} | {cands} |")
    if png is not None:
        md += ["", f"![slimming]({png.name})"]
    md += [
        "",
        "## Train it",
        "",
        "From scratch:",
        "",
        "```bash",
        info["train_scratch"],
        "```",
        "",
        "Starting from the supernet's weights (the path's weights, BatchNorm statistics recalibrated):",
        "",
        "```bash",
        info["train_supernet"],
        "```",
        "",
        f"Use it like any model: `effivit.create_model(\"efficientformer_custom\", arch=\"{info['arch_file']}\", "
        f"num_classes={info['num_classes']})`; `effivit bench --models "
        f"efficientformer_custom:arch={info['arch_file']} --img-size {info['arch']['img_size']}`.",
        "",
    ]
    (folder / "report.md").write_text("\n".join(md), encoding="utf-8")
    (folder / "report.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return folder / "report.md"
