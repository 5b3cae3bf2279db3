"""``effivit bench``: measure the zoo on this machine and show which models are worth considering.

With no arguments (what ``make bench`` runs) it measures the smallest variant of every registered family
plus Next-ViT-S with each of its attention kinds, at 224 px, batch 1, fused, on the best local device, in
PyTorch eager fp32, and prints a table with the accuracy/latency Pareto front marked. ``--backend all
--dtype all`` (or ``--preset fastest``) measures every available runtime x precision and answers with the
fastest path of each model. See ``docs/benchmarks.md`` and ``docs/deploy.md``.
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
PRESETS: dict[str, dict[str, Any]] = {
    # The setting of Next-ViT's published attention comparison: fp16, batch 8, on a GPU.
    "nextvit-attn": {"models": ["nextvit_small:attn=original", "nextvit_small:attn=bchw", "nextvit_small:attn=xca"],
                     "dtype": ["fp16"], "backend": ["eager", "tensorrt"], "batch_size": [8], "img_size": [224, 384],
                     "device": "cuda",
                     # Printed beside the measured TensorRT rows (the figures issue 12 cites for this setting).
                     "published": {"where": "V100, TensorRT fp16, batch 8",
                                   "ms": {("original", 224): 3.45, ("original", 384): 7.75, ("xca", 384): 6.09}}},
    # The fastest deployable path of each model: every runtime x precision installed here.
    "fastest": {"backend": ["all"], "dtype": ["all"]},
}

TABLE_COLUMNS: list[tuple[str, str] | tuple[str, str, str]] = [
    ("label", "model"), ("img_size", "size"), ("batch_size", "batch"), ("backend", "backend"), ("dtype", "dtype"),
    ("median_ms", "median ms", ".2f"), ("iqr_ms", "IQR ms", ".2f"), ("throughput_ips", "img/s", ".1f"),
    ("params_m", "params M", ".2f"), ("gmacs", "GMACs", ".3f"), ("achieved_gflops", "GFLOP/s", ".1f"),
    ("pct_of_gemm", "% GEMM", ".0f"), ("top1", "top-1", ".1f"), ("peak_mem_mb", "mem MB", ".0f"),
    ("speedup_vs_eager", "x eager", ".2f"), ("logit_err", "logit err", ".1e"), ("held", "acc"), ("front", "front"),
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
    from .backends import DTYPES, list_backends

    p.add_argument("--backend", nargs="+", default=None, choices=list_backends() + ["all"], metavar="NAME",
                   help=f"runtimes to time, several are timed in alternating rounds: {' '.join(list_backends())} "
                        "or all (what is not installed or has no device is reported as skipped; default eager)")
    p.add_argument("--dtype", nargs="+", default=None, choices=list(DTYPES) + ["all"], metavar="DTYPE",
                   help=f"precisions: {' '.join(DTYPES)} or all; each backend runs those it offers (fp16/bf16: "
                        "weights cast once with deploy.to_dtype in torch; int8: static quantization; default fp32)")
    p.add_argument("--calibration", default=None, metavar="DIR",
                   help="images for int8 calibration (class sub-folders allowed); without it a small synthetic "
                        "set is used and the accuracy of int8 rows is reported as unknown")
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
                   help="fastest: every runtime x precision (= --backend all --dtype all); "
                        "nextvit-attn: Next-ViT's published attention comparison (fp16, batch 8, CUDA, eager and TensorRT)")
    p.add_argument("--out", default=None, metavar="DIR", help="write results.csv, results.json and charts here")
    p.add_argument("--csv", default=None, metavar="PATH", help="also write the CSV here")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the JSON here")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory probes (faster)")
    p.add_argument("--no-gemm", action="store_true", help="skip measuring this machine's GEMM rates (fp32, bf16, int8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_command, _bench_parser=p)


def _settings_from_args(args: argparse.Namespace):
    import torch

    from .runner import Settings

    preset = PRESETS.get(args.preset or "", {})
    device = args.device if args.device != "auto" else preset.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = args.img_size or (list(SWEEP_SIZES) if args.resolution_sweep else preset.get("img_size", [224]))
    batches = args.batch_size or preset.get("batch_size", [1])
    cuda = device == "cuda"
    big = args.resolution_sweep  # large inputs: fewer calls, each is long
    warmup = args.warmup if args.warmup is not None else (50 if cuda else (3 if big else 10))
    iters = args.iters if args.iters is not None else (200 if cuda else (10 if big else 50))
    max_time = args.max_time if args.max_time is not None else (None if args.iters is not None else 10.0)
    return Settings(
        img_sizes=tuple(sizes), batch_sizes=tuple(batches), backends=_expand_backends(args, preset),
        dtypes=_expand_dtypes(args, preset), channels_last=args.channels_last, threads=args.threads,
        device=device, warmup=warmup, iters=iters, rounds=args.rounds, unfused=args.unfused, max_time_s=max_time,
        min_iters=min(3 if big else 10, iters), calibration=args.calibration,
        compare_timm=args.compare_timm, memory=not args.no_memory,
    )


def _expand_backends(args: argparse.Namespace, preset: dict[str, Any]) -> tuple[str, ...]:
    from .backends import list_backends

    names = args.backend or preset.get("backend", ["eager"])
    if "all" in names:
        names = list_backends()
    return tuple(dict.fromkeys(names))


def _expand_dtypes(args: argparse.Namespace, preset: dict[str, Any]) -> tuple[str, ...]:
    from .backends import DTYPES

    names = args.dtype or preset.get("dtype", ["fp32"])
    if "all" in names:
        names = list(DTYPES)
    return tuple(dict.fromkeys(names))


def _specs_from_args(args: argparse.Namespace):
    from .specs import ModelSpec, default_models, select_models

    preset = PRESETS.get(args.preset or "", {})
    if args.models:
        return select_models(args.models)
    if preset.get("models"):
        return select_models(preset["models"])
    if args.resolution_sweep:
        from .specs import is_registered

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
    for key in ("pct_of_gemm", "speedup_vs_eager", "logit_err", "peak_mem_mb"):
        if not any(r.get(key) is not None for r in rows):
            cols = [c for c in cols if c[0] != key]
    if len({(r.get("backend"), r.get("dtype")) for r in rows}) == 1:
        cols = [c for c in cols if c[0] != "held"]
    ok = [dict(r, front="*" if r.get("pareto") else "", held=_held_mark(r)) for r in rows if r.get("status") == "ok"]
    print(format_table(ok, cols), file=file)
    skipped = [r for r in rows if r.get("status") == "skipped"]
    if skipped:
        reasons = sorted({(r["backend"], r["dtype"], r["error"]) for r in skipped})
        print(f"\n{len(skipped)} measurement(s) skipped:", file=file)
        for backend, dtype, err in reasons:
            print(f"  {backend} {dtype}: {err.removeprefix(f'{backend} {dtype}: ')}", file=file)
    failed = [r for r in rows if r.get("status") not in ("ok", "skipped")]
    if failed:
        print(f"\n{len(failed)} measurement(s) failed:", file=file)
        for r in failed:
            print(f"  {r['label']} [{r.get('impl')}/{r['backend']}/{r.get('dtype')}] {r['img_size']}px "
                  f"b{r['batch_size']}: {r['error']}", file=file)


def _held_mark(row: dict[str, Any]) -> str:
    held = row.get("accuracy_held")
    if row.get("dtype") == "fp32":
        return "ref"
    return "held" if held else ("lost" if held is False else "?")


def winner_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """For each model, size and batch: the fastest path whose accuracy is held, and by how much it beats eager
    fp32 (paired ratio); rows of unknown accuracy that were faster are named too."""
    out = []
    keys = sorted({(r["label"], r["img_size"], r["batch_size"]) for r in rows
                   if r.get("status") == "ok" and r.get("impl", "effivit") == "effivit"})
    if len({(r.get("backend"), r.get("dtype")) for r in rows}) < 2:
        return out
    for label, size, batch in keys:
        grp = [r for r in rows if r.get("status") == "ok" and r.get("impl", "effivit") == "effivit"
               and (r["label"], r["img_size"], r["batch_size"]) == (label, size, batch)]
        best = next((r for r in grp if r.get("best_path")), None)
        if best is None:
            continue
        vs = best.get("speedup_vs_eager")
        text = f"{label} {size}px b{batch}: fastest held path {best['backend']} {best['dtype']} " \
               f"{best['median_ms']:.2f} ms" + (f", {vs:.2f}x eager fp32" if vs else "")
        faster = [r for r in grp if r["median_ms"] < best["median_ms"] and r is not best]
        if faster:
            f = min(faster, key=lambda r: r["median_ms"])
            text += f" (faster but accuracy {f.get('accuracy') or 'unknown'}: {f['backend']} {f['dtype']} " \
                    f"{f['median_ms']:.2f} ms)"
        out.append(text)
    return out


def published_lines(rows: Sequence[dict[str, Any]], published: dict[str, Any] | None) -> list[str]:
    """The preset's published latencies beside the TensorRT rows measured for the same attention kind and size
    (a published figure with no measured row is listed as not measured here)."""
    if not published:
        return []
    out = [f"published ({published['where']}) beside this run:"]
    for (attn, size), ms in sorted(published["ms"].items(), key=lambda kv: (kv[0][1], kv[0][0])):
        got = [r for r in rows if r.get("status") == "ok" and r.get("backend") == "tensorrt"
               and r.get("img_size") == size and r.get("label", "").endswith(f"attn={attn}")]
        if got:
            r = min(got, key=lambda r: r["median_ms"])
            out.append(f"  attn={attn} {size}px: {r['median_ms']:.2f} ms here ({r['dtype']}, batch "
                       f"{r['batch_size']}), {ms:.2f} ms published, published / here {ms / r['median_ms']:.2f}")
        else:
            out.append(f"  attn={attn} {size}px: {ms:.2f} ms published; TensorRT not measured here")
    return out


def budget_lines(rows: Sequence[dict[str, Any]], budget_ms: float) -> list[str]:
    """For each size and batch, the best published top-1 under the budget over every (model, runtime,
    precision) whose accuracy is held (or that nothing fits)."""
    from .pareto import best_under_budget
    from .runner import _held

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("impl", "effivit") == "effivit" and _held(r):
            groups.setdefault((r["img_size"], r["batch_size"]), []).append(r)
    out = []
    for (size, batch), grp in sorted(groups.items()):
        where = f"{size}px batch {batch}"
        best = best_under_budget(grp, budget_ms)
        if best is None:
            fastest = min(grp, key=lambda r: r["median_ms"])
            out.append(f"budget {budget_ms:g} ms ({where}): no model with a published top-1 fits; fastest is "
                       f"{fastest['label']} ({fastest['backend']} {fastest['dtype']}) at {fastest['median_ms']:.2f} ms")
        else:
            out.append(f"budget {budget_ms:g} ms ({where}): best top-1 {best['top1']:.1f}% with {best['label']} "
                       f"in {best['backend']} {best['dtype']} ({best['median_ms']:.2f} ms)")
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
    from .timing import gemm_rates

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
    gemm: dict[str, Any] = {}
    if settings.device == "cpu" and not args.no_gemm:
        try:
            gemm = gemm_rates([d for d in settings.dtypes if d != "fp16"] or ["fp32"], threads=settings.threads)
            print("GEMM rates here: " + ", ".join(f"{d} {g['rate']:.0f} G(FL)OP/s ({g['library']})"
                                                  for d, g in gemm.items()), file=sys.stderr)
            from .runner import with_settings

            settings = with_settings(settings, gemm_rates=tuple((d, g["rate"]) for d, g in gemm.items()))
        except Exception as e:  # the ceiling is context, not a reason to stop
            print(f"could not measure the GEMM rates: {e}", file=sys.stderr)
    t0 = time.perf_counter()
    rows = run_benchmark(specs, settings, progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
    print_table(rows)
    for line in winner_lines(rows) + published_lines(rows, PRESETS.get(args.preset or "", {}).get("published")):
        print(line)
    if args.budget_ms is not None:
        for line in budget_lines(rows, args.budget_ms):
            print(line)
    meta = {
        "command": command_line(args),
        "machine": info,
        "settings": settings.as_dict(),
        "gemm": gemm or None,
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


__all__ = ["add_parser", "budget_lines", "print_table", "published_lines", "run_command", "write_outputs",
           "command_line"]
