"""Next-ViT on CPU: effivit's fused Next-ViT-S against timm's nextvit_small, and the three token mixers.

Writes the ``nextvit`` section of docs/benchmarks.md (between ``<!-- BEGIN nextvit -->`` and
``<!-- END nextvit -->``) with the exact command that produced it. Everything is timed in this one process,
alternating candidates round by round (``effivit.bench.timing.paired``); ratios are medians of per-round
ratios.

Part 1 - effivit vs timm, batch 1 at 224: timm's ``nextvit_small`` with random weights in its best form
(``timm.utils.model.reparameterize_model``: the pre-norms merged into q/k/v and fc1; timm has nothing else
for this model) against the same weights loaded into effivit's ``nextvit_small`` and ``deploy.fuse``-d
(every BatchNorm folded, projections merged). Runtimes: eager fp32, eager bf16 autocast (each in NCHW and
channels_last; each implementation is judged in its faster layout), ONNX Runtime fp32 (both exported by
``deploy.export_onnx``, verified against PyTorch) and, beside the issue's three, eager bf16 autocast with
the conv/linear weights cast to bf16 once (``eager-bf16w``, same outputs, both implementations). Achieved
GFLOP/s = 2 x MACs (FlopCounterMode, fused model) / latency, against this machine's fp32 GEMM rate measured
in the same run (torch and ONNX Runtime, the higher).

Part 2 - the token mixers (``attn="original" | "bchw" | "xca"``), fused, at 224, 384 and 512: whole-model
latency (eager fp32, effivit's faster layout from part 1), paired; then each mixer's own time, measured with
forward hooks on every ``e_mhsa`` module during whole-model forwards, and its share of the model's time.

    python benchmarks/nextvit.py                 # default run (3-4 minutes on 2 idle cores)
    python benchmarks/nextvit.py --rounds 15     # tighter medians

On a machine shared with other jobs, OpenMP's spinning threads make 2-thread latencies swing by 10x;
``OMP_WAIT_POLICY=PASSIVE`` (recorded in the command line written to the report) keeps them usable.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import DOC, exact_command, header, measure_ceiling, write_section  # noqa: E402
from torch import nn  # noqa: E402

import effivit  # noqa: E402
from effivit.bench.flops import achieved_gflops, count_macs  # noqa: E402
from effivit.bench.report import format_table, write_json  # noqa: E402
from effivit.bench.timing import Timing, paired, paired_ratio, percentile  # noqa: E402

MODEL = "nextvit_small"
ATTNS = ("original", "bchw", "xca")
SECTION = "nextvit"
# The runtimes the issue's targets name; eager-bf16w (weights cast to bf16 once) is reported beside them.
ISSUE_RUNTIMES = ("eager-fp32", "eager-bf16", "onnxruntime-fp32")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- building ---------------------------------------------------------------------------------------------


def build_pair(seed: int = 0) -> tuple[nn.Module, nn.Module, float]:
    """(effivit fused, timm reparameterized, max |logit diff|) with the same random weights."""
    import timm
    from timm.utils.model import reparameterize_model

    torch.manual_seed(seed)
    theirs = timm.create_model(MODEL, pretrained=False).eval()
    ours = effivit.create_model(MODEL).eval()
    effivit.load_checkpoint(ours, theirs.state_dict())
    ours = effivit.deploy.fuse(ours)
    theirs = reparameterize_model(theirs)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        diff = float((ours(x) - theirs(x)).abs().max())
    return ours, theirs, diff


def channels_last(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def make_call(model: nn.Module, x: torch.Tensor, dtype: str, cl: bool) -> Callable[[], Any]:
    if getattr(model, "is_fused", False):  # ours as effivit runs it in eager on a CPU (its kernel passes)
        model = effivit.deploy.optimize(model, "cpu")
    x = x.contiguous(memory_format=torch.channels_last) if cl else x.contiguous()
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bf16" else contextlib.nullcontext

    def fn() -> Any:
        with torch.inference_mode(), ctx():
            return model(x)

    return fn


def bf16_weights(model: nn.Module) -> nn.Module:
    """A copy whose conv and linear weights are stored in bf16: what autocast would cast them to on every
    call, cast once (the other parameters and buffers stay fp32, so under autocast the outputs are the same
    bits). Only usable under bf16 autocast. Applied to both implementations alike (runtime ``eager-bf16w``)."""
    out = copy.deepcopy(model)
    for m in out.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.to(torch.bfloat16)
    return out


def export_session(model: nn.Module, path: Path, size: int, threads: int | None):
    from effivit.deploy import export_onnx
    from effivit.deploy.formats import onnx_session

    with contextlib.redirect_stdout(io.StringIO()):
        export_onnx(model, path, img_size=size, dynamic_batch=False)
    return onnx_session(path, threads=threads)


def transpose_report(path: Path) -> dict[str, int]:
    """Transpose nodes in an ONNX graph, and how many feed straight into another Transpose (a pair that
    an exporter should have cancelled or merged)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    transposes = [n for n in graph.node if n.op_type == "Transpose"]
    pairs = sum(1 for n in transposes if n.input and getattr(producer.get(n.input[0]), "op_type", "") == "Transpose")
    return {"nodes": len(graph.node), "transposes": len(transposes), "transpose_pairs": pairs}


# --- part 1: effivit vs timm ---------------------------------------------------------------------------------


def part1(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    log("[1] building effivit (fused) and timm (reparameterized) nextvit_small with the same weights")
    ours, theirs, diff = build_pair()
    macs = count_macs(ours, torch.randn(1, 3, 224, 224))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    impls = {"effivit": ours, "timm": theirs}
    cl = {name: channels_last(m) for name, m in impls.items()}
    fns: dict[str, Callable[[], Any]] = {}
    for runtime in args.eager:
        dtype = "fp32" if runtime == "fp32" else "bf16"
        for name in impls:
            nchw_model, cl_model = impls[name], cl[name]
            if runtime == "bf16w":
                nchw_model, cl_model = bf16_weights(nchw_model), bf16_weights(cl_model)
            fns[f"{name}|eager-{runtime}|nchw"] = make_call(nchw_model, x, dtype, False)
            fns[f"{name}|eager-{runtime}|channels_last"] = make_call(cl_model, x, dtype, True)
    graphs: dict[str, dict[str, int]] = {}
    if not args.skip_onnx:
        for name, model in impls.items():
            log(f"[1] exporting {name} to ONNX (verified against PyTorch)")
            path = workdir / f"{name}.onnx"
            t0 = time.perf_counter()
            sess = export_session(model, path, 224, args.threads)
            log(f"    {time.perf_counter() - t0:.0f} s")
            graphs[name] = transpose_report(path)
            feed = {sess.get_inputs()[0].name: x.numpy()}
            fns[f"{name}|onnxruntime-fp32|-"] = (lambda s, f: lambda: s.run(None, f))(sess, feed)
    log(f"[1] timing {len(fns)} candidates, {args.rounds} rounds x {args.iters} calls")
    res = paired(fns, rounds=args.rounds, iters_per_round=args.iters, warmup=args.warmup)
    rows = []
    for key, t in res.items():
        impl, runtime, layout = key.split("|")
        rows.append({"impl": impl, "runtime": runtime, "layout": layout, "ms": t.median_ms,
                     "iqr": f"{t.q1_ms:.1f}-{t.q3_ms:.1f}", "gflops": achieved_gflops(macs, t.median_ms),
                     "key": key})
    runtimes = list(dict.fromkeys(r["runtime"] for r in rows))
    summary = []
    for rt in runtimes:
        best = {}
        for impl in impls:
            cands = [k for k in res if k.startswith(f"{impl}|{rt}|")]
            best[impl] = min(cands, key=lambda k: res[k].median_ms)
        ratios = [a / b for a, b in zip(res[best["timm"]].round_medians, res[best["effivit"]].round_medians)]
        summary.append({
            "runtime": rt, "effivit": best["effivit"].split("|")[2], "effivit_ms": res[best["effivit"]].median_ms,
            "timm": best["timm"].split("|")[2], "timm_ms": res[best["timm"]].median_ms,
            "speedup": paired_ratio(res[best["timm"]], res[best["effivit"]]),
            "q1": percentile(ratios, 25), "q3": percentile(ratios, 75),
            "effivit_gflops": achieved_gflops(macs, res[best["effivit"]].median_ms),
        })
    return {"rows": rows, "summary": summary, "macs": macs, "logit_diff": diff, "graphs": graphs}


# --- part 2: token mixers ---------------------------------------------------------------------------------------


class MixerClock:
    """Wall time spent inside every ``e_mhsa`` module of a model, via forward pre/post hooks."""

    def __init__(self, model: nn.Module) -> None:
        self.total = 0.0
        self._start: dict[int, float] = {}
        self.handles = []
        for name, m in model.named_modules():
            if name.endswith("e_mhsa"):
                self.handles.append(m.register_forward_pre_hook(self._pre))
                self.handles.append(m.register_forward_hook(self._post))
        if not self.handles:
            raise RuntimeError("no e_mhsa modules found")

    def _pre(self, module: nn.Module, inputs: Any) -> None:
        self._start[id(module)] = time.perf_counter()

    def _post(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.total += time.perf_counter() - self._start.pop(id(module))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def profile_mixers(models: dict[str, nn.Module], x: torch.Tensor, rounds: int) -> dict[str, dict[str, float]]:
    """Per model: median over forwards of (mixer ms, whole-model ms), forwards alternating between models."""
    clocks = {k: MixerClock(m) for k, m in models.items()}
    mixer: dict[str, list[float]] = {k: [] for k in models}
    whole: dict[str, list[float]] = {k: [] for k in models}
    share: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    try:
        with torch.inference_mode():
            for k in names:
                models[k](x)
            for r in range(rounds):
                for k in names[r % len(names):] + names[: r % len(names)]:
                    clocks[k].total = 0.0
                    t0 = time.perf_counter()
                    models[k](x)
                    dt = time.perf_counter() - t0
                    mixer[k].append(1e3 * clocks[k].total)
                    whole[k].append(1e3 * dt)
                    share[k].append(clocks[k].total / dt)
    finally:
        for c in clocks.values():
            c.remove()
    return {k: {"mixer_ms": statistics.median(mixer[k]), "model_ms": statistics.median(whole[k]),
                "share": statistics.median(share[k])} for k in names}


TIMM_ROW = "timm original"


def part2(args: argparse.Namespace, cl: bool) -> list[dict[str, Any]]:
    rows = []
    torch.manual_seed(0)
    base = {a: effivit.deploy.fuse(effivit.create_model(MODEL, attn=a).eval()) for a in ATTNS}
    if not args.skip_timm:
        # For context: the released token-layout mixer (timm's reparameterized model, its own code).
        import timm
        from timm.utils.model import reparameterize_model

        base[TIMM_ROW] = reparameterize_model(timm.create_model(MODEL, pretrained=False).eval())
    models = {a: channels_last(m) if cl else m for a, m in base.items()}
    for size in args.sizes:
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
        macs = {a: count_macs(m, x) for a, m in models.items()}
        fns = {a: make_call(m, x, "fp32", cl) for a, m in models.items()}
        log(f"[2] {size}px: timing {len(fns)} models, {args.variant_rounds} rounds x {args.variant_iters} calls")
        res: dict[str, Timing] = paired(fns, rounds=args.variant_rounds, iters_per_round=args.variant_iters,
                                        warmup=2)
        log(f"[2] {size}px: per-mixer time with forward hooks, {args.profile_rounds} forwards each")
        xin = x.contiguous(memory_format=torch.channels_last) if cl else x
        prof = profile_mixers(models, xin, args.profile_rounds)
        for a in models:
            t = res[a]
            ratios = [o / v for o, v in zip(res["original"].round_medians, t.round_medians)]
            rows.append({
                "size": size, "attn": a, "ms": t.median_ms, "gmacs": macs[a] / 1e9,
                "speedup": paired_ratio(res["original"], t), "q1": percentile(ratios, 25),
                "q3": percentile(ratios, 75), "mixer_ms": prof[a]["mixer_ms"],
                "mixer_speedup": prof["original"]["mixer_ms"] / prof[a]["mixer_ms"],
                "share": 100 * prof[a]["share"],
            })
    return rows


# --- verdicts and report -------------------------------------------------------------------------------------


def verdict(ok: bool, noisy_ok: bool = False) -> str:
    if ok:
        return "PASS"
    return "FAIL (within run noise)" if noisy_ok else "FAIL"


def render(p1: dict[str, Any] | None, p2: list[dict[str, Any]], gemm, command: str,
           settings: dict[str, Any], layout2: str) -> list[str]:
    ceiling = gemm.best_gflops
    lines = ["### Next-ViT (issue 2)", ""]
    lines += header(command, gemm, {"Timing": ", ".join(f"{k} {v}" for k, v in settings.items())})
    checks: list[tuple[str, str]] = []
    if p1 is not None:
        lines += ["", f"#### effivit `{MODEL}` (fused) vs timm `{MODEL}` (`reparameterize_model`), batch 1, 224 px",
                  "", f"Same weights; max |logit difference| {p1['logit_diff']:.1e}; "
                  f"{p1['macs'] / 1e9:.3f} GMACs (FlopCounterMode on the fused model).", ""]
        for r in p1["rows"]:
            r["pct"] = 100 * r["gflops"] / ceiling
        cols = [("impl", "implementation"), ("runtime", "runtime"), ("layout", "layout"), ("ms", "median ms", ".2f"),
                ("iqr", "IQR ms"), ("gflops", "GFLOP/s", ".0f"), ("pct", "% of GEMM", ".0f")]
        lines.append(format_table(p1["rows"], cols, style="markdown"))
        lines.append("")
        for s in p1["summary"]:
            s["verdict"] = verdict(s["speedup"] >= 1.0, s["q3"] >= 1.0)
            s["iqr"] = f"{s['q1']:.2f}-{s['q3']:.2f}"
        cols = [("runtime", "runtime"), ("effivit", "effivit layout"), ("effivit_ms", "effivit ms", ".2f"),
                ("timm", "timm layout"), ("timm_ms", "timm ms", ".2f"), ("speedup", "speedup (timm/effivit)", ".3f"),
                ("iqr", "per-round IQR"), ("verdict", "no slower than timm")]
        lines.append(format_table(p1["summary"], cols, style="markdown"))
        issue_runtimes = [s for s in p1["summary"] if s["runtime"] in ISSUE_RUNTIMES]
        if issue_runtimes:
            best = min(issue_runtimes, key=lambda s: s["effivit_ms"])
            pct = 100 * best["effivit_gflops"] / ceiling
            checks.append((f"best of the issue's runtimes ({best['runtime']}, {best['effivit']}) reaches >= 80% "
                           "of the fp32 GEMM rate",
                           f"{verdict(pct >= 80)}: {best['effivit_gflops']:.0f} GFLOP/s = {pct:.0f}% of {ceiling:.0f}"))
        for s in p1["summary"]:
            if s["runtime"] not in ISSUE_RUNTIMES:
                pct = 100 * s["effivit_gflops"] / ceiling
                checks.append((f"(extra) {s['runtime']} ({s['effivit']}): share of the fp32 GEMM rate",
                               f"{s['effivit_gflops']:.0f} GFLOP/s = {pct:.0f}% of {ceiling:.0f}"))
        for s in p1["summary"]:
            checks.append((f"{s['runtime']}: no slower than timm", f"{s['verdict']}: {s['speedup']:.3f}x"))
        if p1["graphs"]:
            g = p1["graphs"]
            lines += ["", "ONNX graphs (dynamo exporter, optimised): " + "; ".join(
                f"{k}: {v['nodes']} nodes, {v['transposes']} Transpose, {v['transpose_pairs']} Transpose->Transpose"
                for k, v in g.items()) + "."]
    if p2:
        lines += ["", f"#### Token mixers, fused `{MODEL}`, eager fp32, batch 1, {layout2}", ""]
        cols = [("size", "px"), ("attn", "attn"), ("ms", "model ms", ".2f"), ("speedup", "model speedup vs original", ".3f"),
                ("iqr", "per-round IQR"), ("gmacs", "GMACs", ".2f"), ("mixer_ms", "mixer ms", ".2f"),
                ("mixer_speedup", "mixer speedup vs original", ".2f"), ("share", "attention share %", ".1f")]
        for r in p2:
            r["iqr"] = f"{r['q1']:.2f}-{r['q3']:.2f}"
        lines.append(format_table(p2, cols, style="markdown"))
        for r in p2:
            if r["attn"] not in ("bchw", "xca"):
                continue
            if r["size"] <= 224:
                checks.append((f"{r['attn']} no slower than original at {r['size']}",
                               f"{verdict(r['speedup'] >= 1.0, r['q3'] >= 1.0)}: {r['speedup']:.3f}x"))
            else:
                checks.append((f"{r['attn']} faster than original at {r['size']}",
                               f"{verdict(r['speedup'] > 1.0, r['q3'] > 1.0)}: {r['speedup']:.3f}x"))
            if r["attn"] == "xca" and r["size"] == 512:
                checks.append(("xca mixer >= 2x faster than the original mixer at 512",
                               f"{verdict(r['mixer_speedup'] >= 2.0)}: {r['mixer_speedup']:.2f}x"))
    lines += ["", "#### Targets", "", format_table([{"target": a, "result": b} for a, b in checks],
                                                    [("target", "target"), ("result", "result")], style="markdown")]
    lines += ["", "speedup = median of per-round latency ratios (> 1: faster). Each implementation is judged in "
              "its faster layout. eager-bf16 = the fp32 model under bf16 autocast; eager-bf16w = the same with "
              "conv/linear weights stored in bf16 (cast once instead of by autocast on every call; identical "
              "outputs), applied to both implementations. Mixer time: wall time inside the `e_mhsa` modules "
              "(forward hooks) during whole-model forwards; attention share = mixer time / model time in the same "
              f"forwards. `{TIMM_ROW}`: timm's model (the released token-layout mixer) for context; its hooks "
              "miss the (B, C, N) <-> (B, N, C) transposes its blocks do around the mixer. bf16 rows are compared "
              "with the same fp32 GEMM ceiling."]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=9, help="alternating rounds, effivit vs timm")
    p.add_argument("--iters", type=int, default=5, help="calls per candidate per round, effivit vs timm")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--eager", nargs="+", default=["fp32", "bf16", "bf16w"], choices=["fp32", "bf16", "bf16w"],
                   help="eager runtimes: fp32, bf16 autocast, bf16 autocast with conv/linear weights cast once")
    p.add_argument("--skip-onnx", action="store_true", help="no ONNX Runtime rows")
    p.add_argument("--skip-timm", action="store_true", help="only the token-mixer part")
    p.add_argument("--sizes", type=int, nargs="*", default=[224, 384, 512], help="token-mixer sizes")
    p.add_argument("--variant-rounds", type=int, default=7)
    p.add_argument("--variant-iters", type=int, default=3)
    p.add_argument("--profile-rounds", type=int, default=9, help="hooked forwards per mixer and size")
    p.add_argument("--layout", choices=["auto", "nchw", "channels_last"], default="auto",
                   help="layout for the token-mixer part (auto: effivit's faster eager fp32 layout in part 1)")
    p.add_argument("--doc", type=Path, default=DOC)
    p.add_argument("--no-doc", action="store_true", help="print only")
    p.add_argument("--json", type=Path, default=None, help="also write raw results here")
    args = p.parse_args(argv)
    command = exact_command(["benchmarks/nextvit.py", *(argv if argv is not None else sys.argv[1:])])
    # Thread-pool settings change what is measured; an exact command names them.
    env = [f"{k}={os.environ[k]}" for k in sorted(os.environ) if k.startswith(("OMP_", "MKL_", "KMP_", "GOMP_"))]
    command = " ".join(env + [command])
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    gemm = measure_ceiling(args.threads)
    log(f"fp32 GEMM: torch {gemm.torch_gflops:.0f} GFLOP/s, onnxruntime {gemm.ort_gflops or 0:.0f} GFLOP/s")
    with tempfile.TemporaryDirectory(prefix="effivit-nextvit-") as tmp:
        p1 = None if args.skip_timm else part1(args, Path(tmp))
    layout = args.layout
    if layout == "auto":
        layout = "channels_last"
        if p1 is not None:
            fp32 = [s for s in p1["summary"] if s["runtime"] == "eager-fp32"]
            if fp32:
                layout = fp32[0]["effivit"]
    p2 = part2(args, layout == "channels_last") if args.sizes else []
    # The ceiling is what the machine can do: measure it again at the end and keep the higher (a busy
    # moment at the start would otherwise inflate every "% of GEMM").
    gemm_end = measure_ceiling(args.threads)
    log(f"fp32 GEMM at the end: torch {gemm_end.torch_gflops:.0f} GFLOP/s, "
        f"onnxruntime {gemm_end.ort_gflops or 0:.0f} GFLOP/s")
    gemm = max(gemm, gemm_end, key=lambda g: g.best_gflops)
    settings = {"rounds": args.rounds, "calls/round": args.iters, "mixer rounds": args.variant_rounds,
                "mixer calls/round": args.variant_iters, "hooked forwards": args.profile_rounds,
                "threads": args.threads or torch.get_num_threads(),
                "wall time": f"{time.perf_counter() - t_start:.0f} s"}
    lines = render(p1, p2, gemm, command, settings, layout)
    print("\n".join(lines))
    if not args.no_doc:
        write_section(SECTION, lines, args.doc)
        log(f"updated section {SECTION} of {args.doc}")
    if args.json:
        write_json(args.json, {"command": command, "gemm": gemm.as_dict(), "part1": p1, "part2": p2})
    return 0


if __name__ == "__main__":
    sys.exit(main())
