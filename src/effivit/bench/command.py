"""``effivit bench``: measure the zoo on this machine and show which models are worth considering.

With no arguments (what ``make bench`` runs) it measures the smallest variant of every registered family
plus Next-ViT-S with each of its attention kinds, at 224 px, batch 1, fused, on the best local device, and
prints a table with the accuracy/latency Pareto front marked. See ``docs/benchmarks.md`` for the method.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SWEEP_SIZES = (224, 320, 448, 640, 768, 1024)
PRESETS = {
    # The setting of Next-ViT's published attention comparison: fp16, batch 8, on a GPU.
    "nextvit-attn": {"models": ["nextvit_small:attn=original", "nextvit_small:attn=bchw", "nextvit_small:attn=xca"],
                     "dtype": "fp16", "batch_size": [8], "device": "cuda"},
}

TABLE_COLUMNS: list[tuple[str, str] | tuple[str, str, str]] = [
    ("label", "model"), ("img_size", "size"), ("batch_size", "batch"), ("backend", "backend"),
    ("median_ms", "median ms", ".2f"), ("iqr_ms", "IQR ms", ".2f"), ("throughput_ips", "img/s", ".1f"),
    ("params_m", "params M", ".2f"), ("gmacs", "GMACs", ".3f"), ("achieved_gflops", "GFLOP/s", ".1f"),
    ("pct_of_gemm", "% GEMM", ".0f"), ("top1", "top-1", ".1f"), ("peak_mem_mb", "mem MB", ".0f"),
    ("front", "front"),
]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="measure latency of models on this machine (the accuracy/latency front)",
        description=__doc__.split("\n\n")[0] + " With no arguments: the smallest variant of every family plus "
        "Next-ViT-S with each attention kind, 224 px, batch 1, fused, best local device.",
    )
    p.add_argument("--models", nargs="+", default=None, metavar="NAME",
                   help="names, glob patterns ('levit*'), 'all', or name:key=value (e.g. nextvit_small:attn=xca); "
                        "default: smallest variant of every family + Next-ViT-S attention kinds")
    p.add_argument("--img-size", type=int, nargs="+", default=None, metavar="N",
                   help="square input sizes (default 224; --resolution-sweep: 224..1024)")
    p.add_argument("--batch-size", type=int, nargs="+", default=None, metavar="B", help="batch sizes (default 1)")
    p.add_argument("--backend", nargs="+", default=["eager"], choices=("eager", "compile", "onnxruntime"),
                   help="runtimes to time, several are timed in alternating rounds (default eager)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="fp16/bf16 run under autocast (default fp32)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and onnxruntime (default: their own, all cores)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default): cuda if available, else cpu")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 10 CPU, 50 CUDA)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per backend (default 50 CPU, 200 CUDA)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds the timed calls are split into (default 5)")
    p.add_argument("--max-time", type=float, default=None, metavar="S",
                   help="time budget per model/size/batch: slow models get fewer timed calls (at least 10, 3 in a sweep); "
                        "default 10 s unless --iters is given, 0 = no budget")
    p.add_argument("--unfused", action="store_true",
                   help="also time the unfused model (paired) to see what fusing buys")
    p.add_argument("--compare-timm", action="store_true",
                   help="also time timm's implementation of the same models (paired; needs timm)")
    p.add_argument("--resolution-sweep", action="store_true",
                   help="latency against input size (224..1024); default models: Next-ViT-S attention kinds")
    p.add_argument("--budget-ms", type=float, default=None, metavar="MS",
                   help="print the best published top-1 reachable under this latency here")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="nextvit-attn: Next-ViT's published attention comparison (fp16, batch 8, CUDA)")
    p.add_argument("--out", default=None, metavar="DIR", help="write results.csv, results.json and charts here")
    p.add_argument("--csv", default=None, metavar="PATH", help="also write the CSV here")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the JSON here")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory probes (faster)")
    p.add_argument("--no-gemm", action="store_true", help="skip measuring this machine's fp32 GEMM rate")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_command, _bench_parser=p)


def _settings_from_args(args: argparse.Namespace):
    import torch

    from .runner import Settings

    preset = PRESETS.get(args.preset or "", {})
    device = args.device if args.device != "auto" else preset.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = args.img_size or (list(SWEEP_SIZES) if args.resolution_sweep else [224])
    batches = args.batch_size or preset.get("batch_size", [1])
    cuda = device == "cuda"
    big = args.resolution_sweep  # large inputs: fewer calls, each is long
    warmup = args.warmup if args.warmup is not None else (50 if cuda else (3 if big else 10))
    iters = args.iters if args.iters is not None else (200 if cuda else (10 if big else 50))
    max_time = args.max_time if args.max_time is not None else (None if args.iters is not None else 10.0)
    return Settings(
        img_sizes=tuple(sizes), batch_sizes=tuple(batches), backends=tuple(dict.fromkeys(args.backend)),
        dtype=args.dtype or preset.get("dtype", "fp32"), channels_last=args.channels_last, threads=args.threads,
        device=device, warmup=warmup, iters=iters, rounds=args.rounds, unfused=args.unfused, max_time_s=max_time,
        min_iters=min(3 if big else 10, iters),
        compare_timm=args.compare_timm, memory=not args.no_memory,
    )


def _specs_from_args(args: argparse.Namespace):
    from .runner import ModelSpec, default_models, select_models

    preset = PRESETS.get(args.preset or "", {})
    if args.models:
        return select_models(args.models)
    if preset.get("models"):
        return select_models(preset["models"])
    if args.resolution_sweep:
        from .runner import is_registered

        if is_registered("nextvit_small"):
            from ..models.nextvit import ATTN_KINDS

            return [ModelSpec("nextvit_small", (("attn", k),)) for k in ATTN_KINDS]
    return default_models()


def print_table(rows: Sequence[dict[str, Any]], file=None) -> None:
    from .report import format_table

    file = file or sys.stdout
    cols = list(TABLE_COLUMNS)
    if any(r.get("impl") not in (None, "effivit") for r in rows):
        cols.insert(1, ("impl", "impl"))
    if any(r.get("speedup_vs_timm") is not None for r in rows):
        cols.append(("speedup_vs_timm", "x timm", ".2f"))
    if any(r.get("fuse_speedup") is not None for r in rows):
        cols.append(("fuse_speedup", "x unfused", ".2f"))
    if not any(r.get("pct_of_gemm") is not None for r in rows):
        cols = [c for c in cols if c[0] != "pct_of_gemm"]
    ok = [dict(r, front="*" if r.get("pareto") else "") for r in rows if r.get("status") == "ok"]
    print(format_table(ok, cols), file=file)
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        print(f"\n{len(failed)} measurement(s) failed:", file=file)
        for r in failed:
            print(f"  {r['label']} [{r.get('impl')}/{r['backend']}] {r['img_size']}px b{r['batch_size']}: "
                  f"{r['error']}", file=file)


def budget_lines(rows: Sequence[dict[str, Any]], budget_ms: float) -> list[str]:
    """For each setting, the best published top-1 under the budget (or that nothing fits)."""
    from .pareto import best_under_budget

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("impl", "effivit") == "effivit":
            groups.setdefault((r["img_size"], r["batch_size"], r["backend"], r["dtype"]), []).append(r)
    out = []
    for (size, batch, backend, dtype), grp in sorted(groups.items()):
        where = f"{size}px batch {batch} {backend} {dtype}"
        best = best_under_budget(grp, budget_ms)
        if best is None:
            fastest = min(grp, key=lambda r: r["median_ms"])
            out.append(f"budget {budget_ms:g} ms ({where}): no model with a published top-1 fits; fastest is "
                       f"{fastest['label']} at {fastest['median_ms']:.2f} ms")
        else:
            out.append(f"budget {budget_ms:g} ms ({where}): best top-1 {best['top1']:.1f}% with {best['label']} "
                       f"({best['median_ms']:.2f} ms)")
    return out


def write_outputs(rows: list[dict[str, Any]], meta: dict[str, Any], out: str | None, csv_path: str | None,
                  json_path: str | None, sweep: bool = False) -> list[Path]:
    from .report import write_csv, write_json
    from .runner import RESULT_FIELDS

    written: list[Path] = []
    payload = dict(meta, results=rows)
    if out:
        d = Path(out)
        written.append(write_csv(d / "results.csv", rows, RESULT_FIELDS))
        written.append(write_json(d / "results.json", payload))
        written += write_charts(rows, d, sweep=sweep)
    if csv_path:
        written.append(write_csv(csv_path, rows, RESULT_FIELDS))
    if json_path:
        written.append(write_json(json_path, payload))
    return written


def write_charts(rows: Sequence[dict[str, Any]], out: Path, sweep: bool = False) -> list[Path]:
    from .plot import plot_front, plot_resolution

    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return []
    written = []
    if sweep or len({r["img_size"] for r in ok}) > 2:
        for batch in sorted({r["batch_size"] for r in ok}):
            grp = [r for r in ok if r["batch_size"] == batch]
            written.append(plot_resolution(grp, out / f"resolution_b{batch}.png",
                                           title=f"latency vs input size (batch {batch}, {grp[0]['dtype']}, "
                                                 f"{grp[0]['device']})"))
    if not sweep:
        for size, batch in sorted({(r["img_size"], r["batch_size"]) for r in ok}):
            grp = [r for r in ok if r["img_size"] == size and r["batch_size"] == batch]
            written.append(plot_front(grp, out / f"front_{size}px_b{batch}.png",
                                      title=f"top-1 vs latency at {size}px, batch {batch}, {grp[0]['dtype']}, "
                                            f"{grp[0]['device']} (* = Pareto front)"))
    return written


def run_command(args: argparse.Namespace) -> int:
    import torch

    from .machine import machine_info, machine_line
    from .runner import run_benchmark
    from .timing import gemm_rate

    settings = _settings_from_args(args)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.compare_timm:
        try:
            import timm  # noqa: F401
        except ImportError as e:
            raise RuntimeError("--compare-timm needs timm installed (pip install timm)") from e
    specs = _specs_from_args(args)
    info = machine_info(settings.device)
    print(f"effivit bench: {len(specs)} model(s) on {machine_line(info)}", file=sys.stderr)
    gemm = None
    if settings.device == "cpu" and settings.dtype == "fp32" and not args.no_gemm:
        try:
            gemm = gemm_rate(threads=settings.threads)
            print(f"fp32 GEMM here: {gemm.torch_gflops:.0f} GFLOP/s (torch)"
                  + (f", {gemm.ort_gflops:.0f} (onnxruntime)" if gemm.ort_gflops else ""), file=sys.stderr)
            from .runner import with_settings

            settings = with_settings(settings, gemm_gflops=gemm.best_gflops)
        except Exception as e:  # the ceiling is context, not a reason to stop
            print(f"could not measure the GEMM rate: {e}", file=sys.stderr)
    t0 = time.perf_counter()
    rows = run_benchmark(specs, settings, progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
    print_table(rows)
    if args.budget_ms is not None:
        for line in budget_lines(rows, args.budget_ms):
            print(line)
    meta = {
        "command": command_line(args),
        "machine": info,
        "settings": settings.as_dict(),
        "gemm": gemm.as_dict() if gemm else None,
        "elapsed_s": elapsed,
        "budget_ms": args.budget_ms,
    }
    for path in write_outputs(rows, meta, args.out, args.csv, args.json, sweep=args.resolution_sweep):
        print(f"wrote {path}", file=sys.stderr)
    print(f"done in {elapsed:.0f} s; latency is per machine: compare numbers from one run only.", file=sys.stderr)
    ok = sum(r["status"] == "ok" for r in rows)
    return 0 if ok or not rows else 1


def command_line(args: argparse.Namespace) -> str:
    """The ``effivit bench`` command that reproduces ``args`` (options that differ from the defaults)."""
    parser = getattr(args, "_bench_parser", None)
    parts = ["effivit", "bench"]
    for action in parser._actions if parser is not None else ():
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag] + [shlex.quote(str(v)) for v in value]
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


__all__ = ["add_parser", "budget_lines", "print_table", "run_command", "write_outputs", "command_line"]
