"""The training proof on real data, written into docs/training.md: the digits demo and a small DeiT study.

    python benchmarks/train_digits.py demo       # efficientvit_b0 on the digits, >= 95 % val top-1 in < 10 min
    python benchmarks/train_digits.py distill    # LeViT-128S student: no teacher / soft / hard distillation
    python benchmarks/train_digits.py all
    python benchmarks/train_digits.py report     # rewrite the doc sections from WORKDIR/results.json

Every number comes from the `effivit` commands printed in the doc (run as subprocesses, timed by wall
clock). The teacher of the study is the demo's model (trained first, for 30 epochs; the students get 5,
a budget in which the student alone stays below the teacher). Runs live under --workdir (default runs/digits-study); results are also written to
WORKDIR/results.json. OMP_NUM_THREADS defaults to 1 (see docs/training.md: threads on a busy CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "training.md"
CURVE = ROOT / "docs" / "training_digits_curves.png"

DEMO_MODEL = "efficientvit_b0"
DEMO_EPOCHS = 30
STUDENT = "levit_128s"
STUDENT_EPOCHS = 5  # a short schedule: alone, LeViT-128S is still below the teacher here
# Digits are not mirror-symmetric (no flip); crops keep most of the digit; 32 px = the models' size divisor.
RECIPE = ["--img-size", "32", "--crop-pct", "1", "--batch-size", "64", "--lr", "2e-3", "--warmup-epochs", "2",
          "--hflip", "0", "--scale", "0.6", "1", "--randaugment", "2", "5", "--workers", "0", "--seed", "0"]


def _effivit(args: list[str], env: dict[str, str]) -> float:
    """Run ``python -m effivit ARGS``; its output streams through. Returns the wall time in seconds."""
    print("$ effivit " + " ".join(shlex.quote(a) for a in args), flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "effivit", *args], check=True, env=env, cwd=ROOT)
    return time.perf_counter() - t0


def _shown(args: list[str], workdir: Path) -> str:
    """The command as documented: paths relative to the repository root."""
    text = " ".join(shlex.quote(a) for a in args)
    return "effivit " + text.replace(str(workdir.resolve()) + "/", f"{_rel(workdir)}/")


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _machine(env: dict[str, str]) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
            f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS')}; load average {load:.1f} when the run started "
            f"(the machine was shared with other jobs, so times are upper bounds)")


def _train(name: str, model: str, epochs: int, data: Path, workdir: Path, env: dict[str, str],
           extra: list[str] = ()) -> dict:
    out = workdir / name
    args = ["train", "--model", model, "--data", str(data), "--epochs", str(epochs), *RECIPE, *extra,
            "--output", str(out), "--overwrite", "--no-progress", "--plot"]
    machine = _machine(env)
    seconds = _effivit(args, env)
    rows = _rows(out)
    final = rows[-1]
    reached = next((r["epoch"] + 1 for r in rows if r.get("val_top1", 0) >= 95.0), None)
    return {"name": name, "model": model, "epochs": epochs, "command": _shown(args, workdir), "seconds": seconds,
            "val_top1": final["val_top1"], "val_top5": final["val_top5"], "val_loss": final["val_loss"],
            "best_top1": max(r["val_top1"] for r in rows if "val_top1" in r), "first_epoch_95": reached,
            "img_per_s": sorted(r["throughput"] for r in rows)[len(rows) // 2], "output": _rel(out),
            "machine": machine}


def _data(workdir: Path, env: dict[str, str]) -> tuple[Path, str]:
    data = workdir / "digits32"
    args = ["data", "digits", str(data), "--size", "32"]
    if not (data / "digits.json").exists():
        _effivit(args, env)
    return data, _shown(args, workdir)


def _save(workdir: Path, key: str, value) -> dict:
    path = workdir / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[key] = value
    path.write_text(json.dumps(results, indent=2) + "\n")
    return results


def _section(name: str, markdown: str) -> None:
    from effivit.bench.report import update_section

    update_section(DOC, name, markdown)


def demo_markdown(r: dict) -> str:
    lo = next(e for e in r["eval"] if e["img_size"] == 64 and e["weights"] == "unfused")
    table = ["| weights | img size | top-1 % | top-5 % | loss |", "|---|---|---|---|---|"]
    table += [f"| {e['weights']} | {e['img_size']} | {e['top1']:.2f} | {e['top5']:.2f} | {e['loss']:.4f} |"
              for e in r["eval"]]
    md = "\n".join([
        f"Produced by `python benchmarks/train_digits.py demo` (`OMP_NUM_THREADS={r.get('threads', '1')}`), "
        f"which ran:",
        "",
        "```bash",
        r["data_command"],
        r["command"],
        r["eval_command"],
        "```",
        "",
        f"* **{r['model']}**, {r['epochs']} epochs from scratch on the 1,438 training digits at 32x32: "
        f"final validation top-1 **{r['val_top1']:.2f} %** (top-5 {r['val_top5']:.2f} %, loss {r['val_loss']:.4f}; "
        f"best epoch {r['best_top1']:.2f} %), 95 % first reached after epoch {r['first_epoch_95']}.",
        f"* Wall time of the training command: **{r['seconds'] / 60:.1f} min** ({r['seconds']:.0f} s, evaluation "
        f"and checkpoints included; median {r['img_per_s']:.0f} training img/s).",
        f"* Machine: {r['machine']}.",
        "",
        f"![training curves of the digits demo]({CURVE.name})",
        "",
        "`effivit eval` on the final checkpoint, unfused and fused (`effivit.deploy.fuse`), at the training size "
        "and at twice it (the 8x8 scans were upscaled to 32 px, so 64 px is a resolution the model never saw):",
        "",
        *table,
        "",
        f"At 64 px the model, trained only at 32 px, falls to {lo['top1']:.2f} % top-1: a new resolution "
        f"needs fine-tuning at that size (`--pretrained runs/.../last.pt --img-size 64`). Fused and unfused "
        f"weights give the same figures.",
    ])
    return md


def demo(workdir: Path, env: dict[str, str]) -> dict:
    data, data_cmd = _data(workdir, env)
    r = _train("demo", DEMO_MODEL, DEMO_EPOCHS, data, workdir, env)
    shutil.copyfile(ROOT / r["output"] / "curves.png", CURVE)
    ckpt = ROOT / r["output"] / "last.pt"
    eval_json = workdir / "demo-eval.json"
    eval_args = ["eval", "--model", DEMO_MODEL, "--checkpoint", str(ckpt), "--data", str(data), "--img-size", "32",
                 "64", "--crop-pct", "1", "--both", "--workers", "0", "--output-json", str(eval_json)]
    _effivit(eval_args, env)
    r["eval"] = json.loads(eval_json.read_text())
    r["eval_command"] = _shown(eval_args, workdir)
    r["data_command"] = data_cmd
    r["threads"] = env["OMP_NUM_THREADS"]
    _save(workdir, "demo", r)
    _section("effivit-train:demo", demo_markdown(r))
    return r


def _images(n: float, signed: bool = True) -> str:
    k = int(round(n))
    return f"{k:+d} {'image' if abs(k) == 1 else 'images'}" if signed else f"{abs(k)} {'image' if abs(k) == 1 else 'images'}"


def distill_markdown(teacher: dict, runs: list[dict]) -> str:
    lines = [
        f"Produced by `python benchmarks/train_digits.py distill` (`OMP_NUM_THREADS={runs[0].get('threads', '1')}`). "
        f"DeiT's question at toy scale: does a student learn better from a teacher? The student is "
        f"**{STUDENT}** (7.0M parameters, a distillation head like DeiT's distillation token), trained from "
        f"scratch for {STUDENT_EPOCHS} epochs with the demo recipe in each of the three runs (same data, seed, "
        f"schedule and epochs). The teacher is the demo's **{DEMO_MODEL}** (convolutional stages + linear "
        f"attention), trained first for {teacher['epochs']} epochs: validation top-1 {teacher['val_top1']:.2f} %. "
        f"alpha = 0.5, tau = 1 (DeiT's settings).",
        "",
        "| student run | distillation | final val top-1 % | top-5 % | val loss | wall time |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(f"| {r['name']} | {r['distill']} | **{r['val_top1']:.2f}** | {r['val_top5']:.2f} | "
                     f"{r['val_loss']:.4f} | {r['seconds'] / 60:.1f} min |")
    per_image = 100 / 359  # points per validation image
    base = runs[0]
    margin = teacher["val_top1"] - base["val_top1"]
    diffs = [r["val_top1"] - base["val_top1"] for r in runs[1:]]
    spread = max(r["val_top1"] for r in runs) - min(r["val_top1"] for r in runs)
    hard = next(r for r in runs if r["distill"] == "hard")
    best = max(runs, key=lambda r: r["val_top1"])
    deit = ("in line with DeiT's ImageNet finding (hard distillation best)" if best is hard and hard is not base
            and hard["val_top1"] > base["val_top1"] else "unlike DeiT's ImageNet finding (hard distillation best)")
    lines += [
        "",
        f"* The teacher is {margin:+.2f} points ({_images(margin / per_image)}) above the student trained alone "
        f"(359 validation images: one image is {per_image:.2f} points).",
        "* With a teacher, against none: "
        + "; ".join(f"{r['distill']} {d:+.2f} points top-1 ({_images(d / per_image)}), val loss "
                    f"{r['val_loss'] - base['val_loss']:+.4f}" for r, d in zip(runs[1:], diffs)) + ".",
        f"* The three students are within {_images(spread / per_image, signed=False)} of each other, {deit}. "
        f"Each run is one seed and was not repeated, so these differences are not shown to exceed seed-to-seed "
        f"variation; and a teacher {_images(margin / per_image, signed=False)} better than the student alone "
        f"has little to add on this data.",
        "",
        "```bash",
    ]
    lines += [r["command"] for r in runs] + ["```", "", f"Machine: {runs[0]['machine']}."]
    return "\n".join(lines)


def distill(workdir: Path, env: dict[str, str]) -> dict:
    data, _ = _data(workdir, env)
    results_path = workdir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    teacher = results.get("demo")
    if teacher is None or not (ROOT / teacher["output"] / "last.pt").exists():
        teacher = demo(workdir, env)
    teacher_ckpt = str(ROOT / teacher["output"] / "last.pt")
    runs = []
    for kind in ("none", "soft", "hard"):
        extra = [] if kind == "none" else ["--teacher", DEMO_MODEL, "--teacher-checkpoint", teacher_ckpt,
                                           "--distill", kind, "--distill-alpha", "0.5", "--distill-tau", "1.0"]
        r = _train(f"student-{kind}", STUDENT, STUDENT_EPOCHS, data, workdir, env, extra)
        r["distill"] = kind
        runs.append(r)
    for r in runs:
        r["threads"] = env["OMP_NUM_THREADS"]
    _save(workdir, "distill", runs)
    _section("effivit-train:distill", distill_markdown(teacher, runs))
    return {"teacher": teacher, "students": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("demo", "distill", "all", "report"),
                   help="report: rewrite the doc sections from WORKDIR/results.json without training")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "digits-study"))
    p.add_argument("--threads", default="1", help="OMP_NUM_THREADS for the runs (default 1)")
    args = p.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=args.threads)
    if args.what == "report":
        results = json.loads((workdir / "results.json").read_text())
        _section("effivit-train:demo", demo_markdown(results["demo"]))
        _section("effivit-train:distill", distill_markdown(results["demo"], results["distill"]))
        return 0
    if args.what in ("demo", "all"):
        demo(workdir, env)
    if args.what in ("distill", "all"):
        distill(workdir, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
