"""Run ``effivit bench`` (the embedded default unless arguments are given) and write its results, with
the top-1/latency chart, into the ``effivit-bench:default`` section of docs/benchmarks.md.

    python benchmarks/zoo.py                       # what `make bench` measures
    python benchmarks/zoo.py --threads 1 --backend eager onnxruntime
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DOC, ROOT, exact_command, header, write_section  # noqa: E402

from effivit.bench.report import format_table  # noqa: E402
from effivit.cli import main as effivit_main  # noqa: E402

SECTION = "effivit-bench:default"
COLUMNS = [
    ("label", "model"), ("backend", "backend"), ("dtype", "dtype"), ("median_ms", "median ms", ".2f"), ("iqr_ms", "IQR ms", ".2f"),
    ("throughput_ips", "img/s", ".1f"), ("params_m", "params M", ".2f"), ("gmacs", "GMACs", ".3f"),
    ("achieved_gflops", "GFLOP/s", ".1f"), ("pct_of_gemm", "% of GEMM", ".1f"), ("top1", "top-1", ".1f"),
    ("peak_mem_mb", "peak mem MB", ".0f"), ("front", "on front"),
]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        rc = effivit_main(["bench", *argv, "--out", tmp])
        if rc != 0:
            return rc
        data = json.loads((Path(tmp) / "results.json").read_text())
        charts = sorted(Path(tmp).glob("*.png"))
        img_dir = ROOT / "docs" / "img"
        img_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        for c in charts:
            dest = img_dir / f"zoo_{c.name}"
            shutil.copyfile(c, dest)
            kept.append(dest)
    gemm = data.get("gemm") or None
    s = data["settings"]
    lines = ["### The zoo on this machine (`effivit bench`)", ""]
    lines += header(exact_command(["benchmarks/zoo.py", *argv]), gemm,
                    {"Settings": f"{', '.join(map(str, s['img_sizes']))} px, batch {', '.join(map(str, s['batch_sizes']))}, "
                                 f"{'/'.join(s['dtypes'])}, {'/'.join(s['backends'])}, {s['device']}, fused, warm-up {s['warmup']}, up to {s['iters']} calls "
                                 f"in {s['rounds']} rounds (time budget {s['max_time_s']} s per model)"})
    rows = [dict(r, front="yes" if r.get("pareto") else "") for r in data["results"] if r["status"] == "ok"]
    for key in sorted({(r["img_size"], r["batch_size"]) for r in rows}):
        grp = sorted((r for r in rows if (r["img_size"], r["batch_size"]) == key), key=lambda r: r["median_ms"])
        lines += ["", f"**{key[0]} px, batch {key[1]}** (sorted by latency)", "", format_table(grp, COLUMNS, "markdown")]
    for r in data["results"]:
        if r["status"] not in ("ok", "skipped"):
            lines.append(f"- failed: {r['label']} [{r['backend']} {r['dtype']}] {r['img_size']} px "
                         f"b{r['batch_size']}: {r['error']}")
    for why in sorted({f"{r['backend']} {r['dtype']}: {r['error']}" for r in data["results"] if r["status"] == "skipped"}):
        lines.append(f"- {why}")
    lines.append("")
    for path in kept:
        rel = path.relative_to(ROOT / "docs")
        lines.append(f"![{path.stem}]({rel.as_posix()})")
    lines += ["", "top-1: published ImageNet-1K figure of the model's released weights; models without one "
              "(Next-ViT-S with attn=bchw/xca) are measured but cannot be on the front."]
    write_section(SECTION, lines, DOC)
    print(f"updated section {SECTION} of {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
