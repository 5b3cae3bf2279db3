"""Did a change slow the fused models? This tree against an earlier revision and timm, paired in one process.

Ratios against timm drift between machines of the same kind (their GEMM rates differ 2x), so comparing
today's ratio with one written down weeks ago on another machine cannot tell a regression from a different
machine. This script answers the question directly: the earlier revision's package is extracted with
``git archive`` under another name (``effivit_at_<rev>``; the package uses relative imports only), both
versions build the same timm weights through their own ``bench.compare.build_pair`` (fused, and with
``deploy.optimize(model, "cpu")`` where the version has it, as each version's benchmarks ran them), and
timm, the old and the new model are timed in alternating rounds in one process. The section written to
``docs/benchmarks.md`` gives new/old and the two ratios against timm per model, batch and precision.

    python benchmarks/against_revision.py --rev dfb7d5e
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import ROOT, exact_command, header, measure_ceiling, write_section  # noqa: E402

from effivit.bench.compare import build_pair  # noqa: E402
from effivit.bench.report import format_table  # noqa: E402
from effivit.bench.runner import make_forward  # noqa: E402
from effivit.bench.timing import geomean, paired, paired_ratio  # noqa: E402

MODELS = ("levit_128s", "efficientformer_l1", "efficientformerv2_s0", "convnextv2_atto", "repvit_m1_0",
          "fastvit_t8", "efficientvit_b0", "efficientvit_m0", "nextvit_small")


def import_revision(rev: str, into: Path):
    """The package ``src/effivit`` of ``rev`` imported as ``effivit_at_<rev>``."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    archive = into / "src.tar"
    with archive.open("wb") as f:
        subprocess.run(["git", "archive", sha, "src/effivit"], cwd=ROOT, check=True, stdout=f)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    name = f"effivit_at_{sha}"
    (into / "src" / "effivit").rename(into / name)
    sys.path.insert(0, str(into))
    return sha, importlib.import_module(name)


def optimized(pkg, model: torch.nn.Module) -> torch.nn.Module:
    optimize = getattr(importlib.import_module(pkg.__name__ + ".deploy"), "optimize", None)  # revisions before the CPU passes had them built in
    return optimize(model, "cpu") if optimize is not None else model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", required=True, help="the earlier revision (any git revision name)")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--batch-size", nargs="+", type=int, default=[1, 8])
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--min-round-ms", type=float, default=150.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-doc", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import effivit

    for name in args.models:
        effivit.registry.get_entry(name)  # an unknown name fails now, with suggestions, not after minutes
    with tempfile.TemporaryDirectory() as tmp:
        sha, old_pkg = import_revision(args.rev, Path(tmp))
        gemm = measure_ceiling(args.threads)
        rows, new_over_old = [], []
        for name in args.models:
            print(f"[{name}] building timm, {sha} and this tree with the same weights", flush=True)
            new, theirs, diff_new = build_pair(name)
            old, _, diff_old = importlib.import_module(old_pkg.__name__ + ".bench.compare").build_pair(name)
            models = {"timm": theirs, "old": optimized(old_pkg, old), "new": optimized(effivit, new)}
            for bs in args.batch_size:
                x = torch.randn(bs, 3, *theirs.pretrained_cfg["input_size"][1:])
                for dtype in args.dtypes:
                    fns = {k: make_forward(m, x, dtype) for k, m in models.items()}
                    t = paired(fns, rounds=args.rounds, iters_per_round=args.iters, warmup=3,
                               min_round_ms=args.min_round_ms)
                    speed = paired_ratio(t["old"], t["new"])
                    new_over_old.append(speed)
                    rows.append(dict(model=name, dtype=dtype, batch=bs, **{f"{k} ms": round(v.median_ms, 2)
                                     for k, v in t.items()},
                                     **{"new vs old": round(speed, 3),
                                        "timm/old": round(paired_ratio(t["timm"], t["old"]), 3),
                                        "timm/new": round(paired_ratio(t["timm"], t["new"]), 3),
                                        "logit diff old/new": f"{diff_old:.1e}/{diff_new:.1e}"}))
                    print(f"  b{bs} {dtype}: new is {speed:.3f}x the speed of {sha}", flush=True)
    gm = geomean(new_over_old)
    slower = [f"{r['model']} {r['dtype']} b{r['batch']} {r['new vs old']:.2f}x" for r in rows
              if r["new vs old"] < 0.95]
    lines = header(exact_command(), gemm, {
        "Settings": f"eager (fused, CPU passes where the version has them), autocast for bf16, {args.threads} "
                    f"threads, rounds {args.rounds}, calls/round >= {args.iters} and >= {args.min_round_ms:g} ms, "
                    f"native size; old = `{sha}` ({_subject(sha)})"})
    lines = ["### This tree against an earlier revision (issue 10: keep the speed)", ""] + lines + [
        "", format_table(rows, [(k, k) for k in rows[0]], style="markdown"), "",
        f"- geometric mean, new vs old (> 1: this tree faster): **{gm:.3f}x** over {len(rows)} cells",
        f"- cells where this tree is more than 5% slower than `{sha}`: {', '.join(slower) or 'none'}",
        "", "new vs old = median of per-round ratios old ms / new ms; timm/x likewise (> 1: faster than timm).",
        "Why this section exists: ratios against timm written down on another machine of the same kind (its",
        "GEMM rate 2x this one's) differ from today's for reasons that are not code; only the old and the new",
        "code timed side by side, in one process, say whether a change slowed a model.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_doc:
        print(f"updated {write_section('against-revision', lines)}")


def _subject(sha: str) -> str:
    out = subprocess.run(["git", "log", "-1", "--format=%ad, %s", "--date=short", sha], cwd=ROOT,
                         capture_output=True, text=True).stdout.strip()
    return out[:90] + ("..." if len(out) > 90 else "")


if __name__ == "__main__":
    main()
