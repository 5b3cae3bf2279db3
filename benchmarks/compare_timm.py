"""effivit vs timm, side by side in one run, per issue group; writes a section of docs/benchmarks.md.

Same weights (timm's random init loaded into ours), our ``deploy.fuse`` form against timm's own
``reparameterize_model`` form, logits checked equal; eager fp32, eager bf16 (autocast) and ONNX Runtime
fp32 at batch 1 and 8, 224 px, timed in alternating rounds in one process; the ratio is the median of the
per-round ratios. Each model's achieved GFLOP/s (2 x MACs / latency) is shown beside this machine's fp32
GEMM rate measured in the same run (torch and ONNX Runtime, the higher). Verdicts against the issue's
targets are computed from these numbers.

    python benchmarks/compare_timm.py --group issue3
    python benchmarks/compare_timm.py --group issue4 --threads 2 --rounds 9
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DOC, exact_command, header, measure_ceiling, write_section  # noqa: E402

from effivit.bench.compare import RUNTIMES, compare_models, geomean_speedup  # noqa: E402
from effivit.bench.report import format_table  # noqa: E402


@dataclass(frozen=True)
class Group:
    title: str
    models: tuple[str, ...]
    # Minimum paired speedup (timm / ours) per model, by runtime prefix ("eager", "onnxruntime", "").
    per_model: dict[str, float] = field(default_factory=dict)
    geomean: float | None = None
    target_text: str = ""


GROUPS = {
    "issue3": Group(
        title="LeViT, EfficientFormer, EfficientFormerV2 (issue 3)",
        models=("levit_128s", "efficientformer_l1", "efficientformerv2_s0"),
        per_model={"eager": 1.3, "onnxruntime": 1.0},
        target_text=">= 1.3x faster than timm in eager (fp32 and bf16), never slower in ONNX Runtime",
    ),
    "issue4": Group(
        title="ConvNeXt V2, RepViT, FastViT, EfficientViT (MIT and MSRA) (issue 4)",
        models=("convnextv2_atto", "repvit_m1_0", "fastvit_t8", "efficientvit_b0", "efficientvit_m0"),
        per_model={"": 1.0},
        geomean=1.2,
        target_text="never slower than timm in each runtime, >= 1.2x on the geometric mean",
    ),
    "issue11": Group(
        title="DeiT, XCiT, MaxViT, Hiera, EVA-02 (issue 11)",
        models=("deit_tiny_patch16_224", "xcit_tiny_12_p16_224", "maxvit_tiny_tf_224", "hiera_tiny_224",
                "eva02_tiny_patch14_224"),
        per_model={"": 1.0},
        geomean=1.1,
        target_text="never slower than timm in each runtime, >= 1.1x on the geometric mean",
    ),
}


def _target(group: Group, runtime: str) -> float | None:
    best = None
    for prefix, value in group.per_model.items():
        if runtime.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, value)
    return None if best is None else best[1]


def verdict(speedup: float | None, q3: float | None, target: float | None) -> str:
    """PASS / FAIL against ``target``; a FAIL whose per-round upper quartile reaches the target is flagged
    as within the noise of this run."""
    if target is None:
        return ""
    if speedup is None:
        return "not measured"
    if speedup >= target:
        return f"PASS (>= {target:g}x)"
    if q3 is not None and q3 >= target:
        return f"FAIL (< {target:g}x, within run noise)"
    return f"FAIL (< {target:g}x)"


def registered(models: Sequence[str]) -> tuple[list[str], list[str]]:
    """(models both effivit and timm have, skip messages for the others)."""
    from effivit.registry import list_models

    ok, skipped = [], []
    try:
        import timm
    except ImportError:
        return [], ["timm is not installed: nothing to compare"]
    for m in models:
        if not list_models(m):
            skipped.append(f"{m}: not registered in effivit yet")
        elif not timm.list_models(m):
            skipped.append(f"{m}: timm has no model of that name")
        else:
            ok.append(m)
    return ok, skipped


def render(group_name: str, group: Group, rows: list[dict[str, Any]], skipped: list[str], command: str,
           gemm, settings: dict[str, Any]) -> list[str]:
    best = gemm.best_gflops if gemm else None
    for r in rows:
        r["verdict"] = verdict(r.get("speedup"), r.get("speedup_q3"), _target(group, r["runtime"]))
        r["speedup_iqr"] = (f"{r['speedup_q1']:.2f}-{r['speedup_q3']:.2f}" if r.get("speedup_q1") is not None
                            else None)
        r["ours_pct"] = 100 * r["ours_gflops"] / best if best and r.get("ours_gflops") else None
        r["timm_pct"] = 100 * r["timm_gflops"] / best if best and r.get("timm_gflops") else None
    lines = [f"### {group.title}", ""]
    lines += header(command, gemm, {"Timing": ", ".join(f"{k} {v}" for k, v in settings.items())})
    lines += ["", f"Target: {group.target_text}.", ""]
    ok = [r for r in rows if r["status"] == "ok"]
    cols = [("model", "model"), ("runtime", "runtime"), ("batch_size", "batch"), ("ours_ms", "effivit ms", ".2f"),
            ("timm_ms", "timm ms", ".2f"), ("speedup", "speedup", ".2f"), ("speedup_iqr", "per-round IQR"),
            ("gmacs", "GMACs/img", ".3f"), ("ours_gflops", "effivit GFLOP/s", ".1f"),
            ("ours_pct", "% of GEMM", ".1f"), ("timm_gflops", "timm GFLOP/s", ".1f"),
            ("timm_pct", "timm % of GEMM", ".1f"), ("max_logit_diff", "logit diff (rel.)", ".1e"),
            ("verdict", "verdict")]
    if ok:
        lines.append(format_table(ok, cols, style="markdown"))
    lines.append("")
    summary = []
    for rt in dict.fromkeys(r["runtime"] for r in ok):
        g = geomean_speedup([r for r in ok if r["runtime"] == rt])
        summary.append(f"geometric mean speedup, {rt}: **{g:.2f}x**")
    overall = geomean_speedup(ok)
    if overall is not None:
        line = f"geometric mean speedup, all runtimes and batches: **{overall:.2f}x**"
        if group.geomean is not None:
            line += f" — {'PASS' if overall >= group.geomean else 'FAIL'} (target >= {group.geomean:g}x)"
        summary.append(line)
    per_model_fail = [r for r in ok if r["verdict"].startswith("FAIL")]
    if group.per_model:
        summary.append(f"per-model targets: {len(ok) - len(per_model_fail)} of {len(ok)} measurements pass"
                       + (": " + "; ".join(f"{r['model']} {r['runtime']} b{r['batch_size']} {r['speedup']:.2f}x"
                                           for r in per_model_fail) if per_model_fail else ""))
    lines += [f"- {s}" for s in summary]
    failed = [r for r in rows if r["status"] != "ok"]
    for r in failed:
        lines.append(f"- failed: {r['model']} {r['runtime']} b{r['batch_size']}: {r['error']}")
    for s in skipped:
        lines.append(f"- skipped: {s}")
    lines += ["", "speedup = timm latency / effivit latency, median of per-round ratios (> 1: effivit faster). "
              "logit diff (rel.) = max |effivit - timm| / max |timm| of the fused models' logits (same weights). "
              "% of GEMM = achieved GFLOP/s (2 x MACs / latency) over the measured fp32 GEMM rate "
              f"(bf16 rows are compared with the same fp32 ceiling). Group `{group_name}`."]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--group", required=True, nargs="+", choices=sorted(GROUPS), help="issue group(s)")
    p.add_argument("--models", nargs="+", default=None, help="only these models of the group(s)")
    p.add_argument("--runtimes", nargs="+", default=["eager-fp32", "eager-bf16", "onnxruntime-fp32"],
                   choices=sorted(RUNTIMES))
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds")
    p.add_argument("--iters", type=int, default=5, help="timed calls per implementation and runtime per round")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--min-round-ms", type=float, default=100.0,
                   help="fast models get more calls per round so a round lasts at least this long")
    p.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads")
    p.add_argument("--doc", type=Path, default=DOC, help="markdown file to update")
    p.add_argument("--no-doc", action="store_true", help="print only, do not update the markdown file")
    p.add_argument("--json", type=Path, default=None, help="also write the raw rows here")
    args = p.parse_args(argv)
    command = exact_command(["benchmarks/compare_timm.py", *(argv if argv is not None else sys.argv[1:])])
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    gemm = measure_ceiling(args.threads)
    print(f"fp32 GEMM: torch {gemm.torch_gflops:.0f} GFLOP/s, onnxruntime {gemm.ort_gflops or 0:.0f} GFLOP/s")
    settings = {"rounds": args.rounds, "calls/round": f">= {args.iters} and >= {args.min_round_ms:g} ms",
                "warm-up": args.warmup,
                "threads": args.threads or torch.get_num_threads(), "img": args.img_size}
    everything: dict[str, Any] = {"command": command, "gemm": gemm.as_dict(), "groups": {}}
    for name in args.group:
        group = GROUPS[name]
        wanted = [m for m in group.models if args.models is None or m in args.models]
        models, skipped = registered(wanted)
        for s in skipped:
            print(f"skipping {s}")
        rows = compare_models(models, runtimes=args.runtimes, batch_sizes=args.batch_size, img_size=args.img_size,
                              rounds=args.rounds, iters_per_round=args.iters, warmup=args.warmup,
                              threads=args.threads, min_round_ms=args.min_round_ms) if models else []
        lines = render(name, group, rows, skipped, command, gemm, settings)
        print("\n".join(lines))
        if not args.no_doc:
            write_section(f"compare_timm:{name}", lines, args.doc)
            print(f"updated section compare_timm:{name} of {args.doc}")
        everything["groups"][name] = {"rows": rows, "skipped": skipped}
    if args.json:
        from effivit.bench.report import write_json

        write_json(args.json, everything)
    return 0


if __name__ == "__main__":
    sys.exit(main())
