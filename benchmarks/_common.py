"""Shared pieces of the scripts that write ``docs/benchmarks.md``: the exact command, the machine header,
this machine's GEMM ceiling and section writing (``effivit.bench.report.update_section``)."""

from __future__ import annotations

import datetime as _dt
import shlex
import sys
from pathlib import Path
from typing import Any

from effivit.bench.machine import machine_info, machine_line
from effivit.bench.report import update_section
from effivit.bench.timing import GemmRate, gemm_rate

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"


def exact_command(argv: list[str] | None = None) -> str:
    """The command line that produced a section, as typed from the repository root."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0])
    try:
        script = script.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script))] + [shlex.quote(a) for a in argv[1:]])


def measure_ceiling(threads: int | None) -> GemmRate:
    """fp32 GEMM GFLOP/s with torch and ONNX Runtime, measured now (n=1024, paired)."""
    return gemm_rate(n=1024, threads=threads)


def header(command: str, gemm: GemmRate | dict[str, Any] | None, extra: dict[str, Any] | None = None) -> list[str]:
    """Markdown lines: command, date, machine, and the GEMM ceiling the figures are compared with."""
    info = machine_info("cpu")
    lines = [
        f"Command: `{command}`",
        "",
        f"Measured {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} on {machine_line(info)}.",
    ]
    if isinstance(gemm, dict) and gemm:
        lines.append("GEMM ceilings measured in the same run (n=1024): " + ", ".join(
            f"{d} **{g['rate']:.0f} G{'OP' if d == 'int8' else 'FLOP'}/s** ({g['library']}, {g['threads']} thread(s))"
            for d, g in gemm.items()) + "; % of GEMM compares each row with its own precision's ceiling.")
    elif isinstance(gemm, GemmRate):
        ort = f"{gemm.ort_gflops:.0f}" if gemm.ort_gflops else "n/a"
        lines.append(f"fp32 GEMM ceiling measured in the same run (n={gemm.n}, {gemm.threads} thread(s)): "
                     f"torch {gemm.torch_gflops:.0f} GFLOP/s, ONNX Runtime {ort} GFLOP/s; "
                     f"figures below use the higher, **{gemm.best_gflops:.0f} GFLOP/s**.")
    for k, v in (extra or {}).items():
        lines.append(f"{k}: {v}")
    return lines


def write_section(name: str, lines: list[str], doc: Path = DOC) -> Path:
    return update_section(doc, name, "\n".join(lines))
