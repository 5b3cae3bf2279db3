"""Accuracy held by each deploy precision, measured on real data with real trained models.

    python benchmarks/deploy_accuracy.py train      # one digits model per family's smallest variant
    python benchmarks/deploy_accuracy.py evaluate   # every runtime x precision against fp32
    python benchmarks/deploy_accuracy.py all

The models are trained with ``effivit train`` on the digits set (scikit-learn's real 8x8 scans at 32 px,
10 epochs, the recipe of ``benchmarks/train_digits.py``); checkpoints live under --workdir (default
/work/helpers/digits_ckpts, outside git) and are reused when present, so ``evaluate`` can be re-run alone.

For each family and each deploy path (eager bf16; ONNX Runtime fp32/int8; OpenVINO fp32/bf16/int8) it
reports, against the same model in PyTorch eager fp32:

* digits validation top-1 (359 images; one image = 0.28 points) and its drop in points; int8 is calibrated
  on 64 training images (``deploy.quantize`` with the family's declared policy);
* on real photographs shipped with scikit-image (at 224 px, out of distribution for a digits model, which
  is the point: the logits are far from the calibration set): top-1 agreement with fp32 and the max logit
  error relative to fp32's max |logit|.

Targets (issue 12): bf16 drop <= 0.2 points, int8 drop <= 1 point. An int8 miss with the default policy is
re-run with the stricter one (LayerNorm/GELU consumers kept in float, percentile ranges) and both are
reported; the table ``src/effivit/data/precision_accuracy.csv`` (what ``effivit bench`` reads to decide
whether a path's accuracy is held) records the declared policy's result.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import DOC, ROOT, exact_command, write_section  # noqa: E402

WORKDIR = Path("/work/helpers/digits_ckpts")
TABLE = ROOT / "src" / "effivit" / "data" / "precision_accuracy.csv"
SECTION = "effivit-deploy:accuracy"
EPOCHS = 10
RECIPE = ["--img-size", "32", "--crop-pct", "1", "--batch-size", "64", "--lr", "2e-3", "--warmup-epochs", "2",
          "--hflip", "0", "--scale", "0.6", "1", "--randaugment", "2", "5", "--workers", "0", "--seed", "0"]
PATHS = [("eager", "bf16"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"),
         ("openvino", "bf16"), ("openvino", "int8")]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "horse", "immunohistochemistry",
          "hubble_deep_field", "colorwheel", "logo", "brick", "grass", "gravel", "page", "text", "clock")
TARGET = {"bf16": 0.2, "fp16": 0.2, "fp32": 0.0, "int8": 1.0}
VAL_IMAGES = 359  # the digits validation split
PER_IMAGE = 100 / VAL_IMAGES
LEARNED_PCT = 50.0  # fp32 digits top-1 below this: the model did not learn, its rows are not evidence


def models() -> list[str]:
    from effivit.bench.specs import smallest_per_family

    return [s.name for s in smallest_per_family()]


def study_size(name: str) -> int | None:
    """The digits training size of ``name``: 32 px rounded up to the model's size divisor; None for
    fixed-size models and those needing more than 64 px (not covered: beyond this study's CPU budget)."""
    from effivit.registry import get_entry

    cfg = get_entry(name).pretrained_cfg()
    if cfg.get("fixed_input_size"):
        return None
    div = int(cfg.get("size_divisor", 1) or 1)
    least = cfg.get("min_input_size") or 0
    least = int(least[-1] if isinstance(least, (tuple, list)) else least)  # (C, H, W) or an int
    size = max(-(-32 // div) * div, least)
    return size if size <= 64 else None  # e.g. MaxViT's windows need 224 px: beyond this study's budget


def train(workdir: Path, only: list[str] | None = None) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    data = workdir / "digits32"
    if not (data / "digits.json").exists():
        subprocess.run([sys.executable, "-m", "effivit", "data", "digits", str(data), "--size", "32"], check=True,
                       env=env)
    for m in only or models():
        out = workdir / m
        size = study_size(m)
        if (out / "last.pt").exists() or size is None:
            continue
        t0 = time.time()
        recipe = list(RECIPE)
        recipe[recipe.index("--img-size") + 1] = str(size)
        r = subprocess.run([sys.executable, "-m", "effivit", "train", "--model", m, "--data", str(data), "--epochs",
                            str(EPOCHS), *recipe, "--output", str(out), "--overwrite", "--no-progress"], env=env)
        print(f"{m}: {'trained' if r.returncode == 0 else 'training FAILED'} in {time.time() - t0:.0f} s "
              f"at {size} px", flush=True)


def _digits(model, data: Path, split: str):
    from effivit.train.data import ImageFolderDataset, eval_transform, resolve_data_config

    cfg = resolve_data_config(model.pretrained_cfg, study_size(model.pretrained_cfg["architecture"]), 1.0)
    ds = ImageFolderDataset(data / split, eval_transform(cfg), classes=[str(i) for i in range(10)])
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    return torch.stack(xs), torch.tensor(ys)


def _photos(model) -> tuple[torch.Tensor, list[str]]:
    import numpy as np
    import skimage.data as skd
    from PIL import Image

    from effivit.deploy.precision import _transform_cfg, load_image

    cfg = _transform_cfg(model)
    xs, names = [], []
    tmp = WORKDIR / "photos"
    tmp.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        try:
            img = np.asarray(getattr(skd, name)())
        except Exception:  # not shipped with this scikit-image (would need a download)
            continue
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.dtype != np.uint8:
            img = img.astype(np.float64)
            img = (255 * (img - img.min()) / max(float(img.max() - img.min()), 1e-9)).astype(np.uint8)
        if img.ndim == 3 and img.shape[-1] == 4:
            img = img[..., :3]
        path = tmp / f"{name}.png"
        Image.fromarray(img).save(path)
        xs.append(load_image(path, 224, cfg, crop_pct=1.0))
        names.append(name)
    return torch.cat(xs), names


def _run_all(run, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([run(x[i:i + batch]) for i in range(0, len(x), batch)])


def _evaluate_model(name: str, workdir: Path, log) -> list[dict]:
    from effivit import create_model
    from effivit.bench.backends import BackendUnavailable, Context, get_backend
    from effivit.deploy import fuse
    from effivit.deploy.precision import QuantPolicy, calibration_from_folder, policy_for

    # The final weights, or the best epoch's where the run diverged at the end (convnextv2_atto's last epoch
    # went to NaN here).
    ckpt = workdir / name / "last.pt"
    unfused = create_model(name, num_classes=10, pretrained=str(ckpt)).eval()
    if not all(torch.isfinite(p).all() for p in unfused.parameters()) and (workdir / name / "best.pt").exists():
        log(f"{name}: the final checkpoint holds non-finite weights; using best.pt")
        unfused = create_model(name, num_classes=10, pretrained=str(workdir / name / "best.pt")).eval()
    model = fuse(unfused)
    family = model.pretrained_cfg["family"]
    data = workdir / "digits32"
    xv, yv = _digits(model, data, "val")
    photos, photo_names = _photos(model)
    calib32 = [x[None] for x in _digits(model, data, "train")[0][:: max(1, 1438 // 64)][:64]]
    calib224 = calibration_from_folder(data / "train", model, 224, max_images=64, crop_pct=1.0)
    with torch.inference_mode():
        ref_v = _run_all(model, xv)
        ref_p = model(photos)
    top1_ref = 100.0 * float((ref_v.argmax(-1) == yv).float().mean())
    rows = []
    declared = policy_for(model)
    strict = QuantPolicy(keep_after=("LayerNormalization", "Gelu"), calibrate="percentile",
                         why="strict: LayerNorm/GELU consumers in float, percentile ranges")
    ctx_v = Context(threads=1, calibration=calib32, key=f"{name}_v")
    ctx_p = Context(threads=1, calibration=calib224, key=f"{name}_p")
    for backend, dtype in PATHS:
        b = get_backend(backend)
        if b.unavailable("cpu", dtype):
            log(f"{name} {backend} {dtype}: skipped: {b.unavailable('cpu', dtype)}")
            continue
        policies = [declared] if dtype == "int8" else [None]
        tried = 0
        while tried < len(policies):
            pol = policies[tried]
            tried += 1
            import effivit.deploy.precision as P

            saved = dict(P.FAMILY_POLICIES)
            if pol is not None:
                P.FAMILY_POLICIES[family] = pol
            try:
                t0 = time.time()
                run_v = b.prepare(model, xv[:1], dtype, ctx_v)
                run_p = b.prepare(model, photos[:1], dtype, ctx_p)
                out_v = _run_all(run_v.run, xv)
                out_p = _run_all(run_p.run, photos, batch=1)
            except BackendUnavailable as e:
                log(f"{name} {backend} {dtype}: {e}")
                break
            finally:
                P.FAMILY_POLICIES.clear()
                P.FAMILY_POLICIES.update(saved)
            top1 = 100.0 * float((out_v.argmax(-1) == yv).float().mean())
            row = {
                "family": family, "model": name, "backend": backend, "dtype": dtype,
                "policy": "" if pol is None else pol.why, "declared": pol is None or pol == declared,
                "top1_fp32": round(top1_ref, 2), "top1": round(top1, 2), "drop_pts": round(top1_ref - top1, 2),
                "digits_agree_pct": round(100.0 * float((out_v.argmax(-1) == ref_v.argmax(-1)).float().mean()), 2),
                "digits_max_err": float((out_v - ref_v).abs().max() / ref_v.abs().max()),
                "photo_agree": f"{int((out_p.argmax(-1) == ref_p.argmax(-1)).sum())}/{len(photo_names)}",
                "photo_max_err": float((out_p - ref_p).abs().max() / ref_p.abs().max()),
                "seconds": round(time.time() - t0, 1),
                "changed": _changed(ref_v, out_v),
            }
            rows.append(row)
            log(f"{name} {backend} {dtype} {row['policy']}: top-1 {top1:.2f} (fp32 {top1_ref:.2f}, drop "
                f"{row['drop_pts']:+.2f}), photos {row['photo_agree']} agree, max err {row['photo_max_err']:.3f}")
            if dtype == "int8" and row["drop_pts"] > TARGET["int8"] and strict not in policies and declared != strict:
                policies.append(strict)
    return rows


def _changed(ref: torch.Tensor, out: torch.Tensor) -> list[dict]:
    """The digits whose prediction the path changed, with fp32's top-2 margin there and that margin's rank
    among all images (rank 1: the closest call of the set): a change at a near-tie is rounding, not damage."""
    top2 = ref.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    order = margin.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(order) + 1)
    idx = (ref.argmax(-1) != out.argmax(-1)).nonzero().flatten().tolist()
    return [{"image": i, "fp32_margin": round(float(margin[i]), 5), "margin_rank": int(rank[i])} for i in idx]


def evaluate(workdir: Path, only: list[str] | None = None, skip_done: bool = False) -> list[dict]:
    results_path = workdir / "deploy_accuracy.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def log(msg: str) -> None:
        print(msg, flush=True)

    for name in models():
        if (only and name not in only) or (skip_done and name in results):
            continue
        if study_size(name) is None:
            results[name] = [{"model": name, "error": "not covered: fixed input size or more than 64 px needed"}]
            continue
        if not (workdir / name / "last.pt").exists():
            log(f"{name}: no checkpoint under {workdir} (run `train` first); skipped")
            continue
        try:
            results[name] = _evaluate_model(name, workdir, log)
        except Exception as e:  # one family's failure is reported, the others still run
            log(f"{name}: FAILED {type(e).__name__}: {e}")
            results[name] = [{"model": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}]
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    return [r for rows in results.values() for r in rows]


def write_table(rows: list[dict]) -> None:
    fields = ["family", "model", "backend", "dtype", "top1_fp32", "top1", "drop_pts", "photo_agree", "photo_max_err"]
    TABLE.parent.mkdir(parents=True, exist_ok=True)
    with TABLE.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            # A model that did not learn the digits (chance-level fp32) says nothing about accuracy held.
            if "error" not in r and r.get("declared", True) and r["top1_fp32"] >= LEARNED_PCT:
                w.writerow({k: (f"{r[k]:.4g}" if isinstance(r[k], float) else r[k]) for k in fields})


def _frac(text: str) -> float:
    a, _, b = text.partition("/")
    return int(a) / max(int(b), 1)


def _ordinal(n: int) -> str:
    return "" if n == 1 else f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')} "


def markdown(rows: list[dict], argv: list[str]) -> str:
    ok = [r for r in rows if "error" not in r]
    lines = [
        "### Accuracy held by each deploy path (digits models, real photographs)",
        "",
        "Command: `python benchmarks/deploy_accuracy.py all` (trains what is missing, evaluates what is not in "
        f"WORKDIR/deploy_accuracy.json; this section last written by `{exact_command(['benchmarks/deploy_accuracy.py', *argv])}`; "
        f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f}).",
        "",
        f"One model per family (its smallest variant) trained with `effivit train` on the digits set ({EPOCHS} "
        "epochs at 32 px (42 px for patch-14 models), 1,438 training images; the final checkpoint, or the best epoch's where the run "
        "diverged at the end), then run in every deploy path and compared with the same "
        "fused model in PyTorch eager fp32. Digits: validation top-1 on 359 images (one image = 0.28 points). "
        "Photographs: the scikit-image sample photographs at 224 px (out of distribution for a digits model, "
        "so their logits are far from the calibration data): top-1 agreement with fp32 and the max logit "
        "error relative to fp32's max |logit|. int8 is calibrated on 64 training digits (at 224 px for the "
        "photographs) with the family's declared policy; targets: bf16 drop <= 0.2 points, int8 <= 1 point.",
        "",
        "| model | path | policy | fp32 top-1 | top-1 | drop (pts) | digits agree % | photos agree | "
        "photo max err | target |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    misses = []
    for r in ok:
        target = TARGET.get(r["dtype"], 0.0)
        met = r["drop_pts"] <= target + 1e-9
        verdict = "met" if met else f"MISS (> {target:g})"
        if r["top1_fp32"] < LEARNED_PCT:
            verdict, met = "not evidence: the model did not learn (fp32 at chance)", True
        if not met and r.get("declared", True):
            changed = r.get("changed", [])
            why = "; ".join(f"image {c['image']}: fp32 top-2 margin {c['fp32_margin']:.3g} logits, the "
                            f"{_ordinal(c['margin_rank'])}smallest of {VAL_IMAGES}" for c in changed[:3])
            misses.append(f"{r['model']} {r['backend']} {r['dtype']} ({r['drop_pts']:+.2f} pts"
                          + (f"; {len(changed)} prediction(s) changed: {why}" if changed else "") + ")")
        lines.append(f"| {r['model']} | {r['backend']} {r['dtype']} | {r.get('policy') or '-'} | {r['top1_fp32']:.2f} | "
                     f"{r['top1']:.2f} | {r['drop_pts']:+.2f} | {r['digits_agree_pct']:.1f} | {r['photo_agree']} | "
                     f"{r['photo_max_err']:.3f} | {verdict} |")
    for r in rows:
        if "error" in r:
            lines.append(f"\n- {r['model']}: failed: {r['error']}")
    lines += ["", "Misses of the declared policies: " + ("; ".join(misses) if misses else "none") + "."]
    weak = [f"{r['model']} {r['backend']} {r['dtype']} ({r['photo_agree']})" for r in ok
            if r["top1_fp32"] >= LEARNED_PCT and _frac(r["photo_agree"]) < 0.8]
    if weak:
        lines.append("Photographs, top-1 agreement with fp32 below 80% (int8 calibrated on digits, evaluated far "
                     "outside that distribution; calibrate on images like the deployment's): " + "; ".join(weak) + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("train", "evaluate", "all", "report"))
    p.add_argument("--workdir", default=str(WORKDIR))
    p.add_argument("--models", nargs="+", default=None, help="only these models (evaluate)")
    args = p.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if args.what == "train":
        train(workdir, args.models)
        return 0
    if args.what == "all":
        # Models with checkpoints first, then each missing one trained and evaluated in turn.
        rows = evaluate(workdir, args.models, skip_done=True)
        for m in args.models or models():
            train(workdir, [m])
            rows = evaluate(workdir, [m], skip_done=True)
    elif args.what == "evaluate":
        rows = evaluate(workdir, args.models)
    elif args.what == "report":
        rows = [r for rs in json.loads((workdir / "deploy_accuracy.json").read_text()).values() for r in rs]
    else:
        return 0
    write_table(rows)
    write_section(SECTION, markdown(rows, argv).splitlines(), DOC)
    print(f"wrote {TABLE} and section {SECTION} of {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
