"""``effivit train``, ``effivit eval`` and ``effivit data``: the command-line side of :mod:`effivit.train`.

Registered by ``effivit.cli.build_parser`` through :func:`add_parsers`; each handler returns an exit code.
``torchrun --nproc_per_node=N -m effivit train ...`` runs the same handler in N processes.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path
from typing import Any


def _kv(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value  # a bare word such as attn=xca
    return key, parsed


def _model_args(p: argparse.ArgumentParser, dest: str = "model_arg", flag: str = "--model-arg") -> None:
    p.add_argument(flag, dest=dest, type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword for the model builder, e.g. attn=xca (repeatable)")


# ---- train -----------------------------------------------------------------------------------------------
def _cmd_train(args: argparse.Namespace) -> int:
    from .loop import SimulatedCrash, TrainConfig, train

    cfg = TrainConfig(
        model=args.model, data=args.data, output=args.output or "", epochs=args.epochs,
        batch_size=args.batch_size, accum_steps=args.accum_steps, lr=args.lr, min_lr=args.min_lr,
        warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay, smoothing=args.smoothing,
        drop_path=args.drop_path, clip_grad=args.clip_grad, amp=args.amp, channels_last=args.channels_last,
        ema_decay=args.ema_decay, img_size=args.img_size, crop_pct=args.crop_pct, scale=tuple(args.scale),
        hflip=args.hflip, randaugment=None if args.randaugment[0] == 0 else tuple(args.randaugment),
        mixup=args.mixup, cutmix=args.cutmix, workers=args.workers, pretrained=args.pretrained,
        model_kwargs=dict(args.model_arg), teacher=args.teacher, teacher_checkpoint=args.teacher_checkpoint,
        teacher_kwargs=dict(args.teacher_arg), distill=args.distill, distill_tau=args.distill_tau,
        distill_alpha=args.distill_alpha, resume=args.resume, overwrite=args.overwrite, seed=args.seed,
        deterministic=args.deterministic, device=args.device, progress=not args.no_progress, plot=args.plot,
        log_interval=args.log_interval, eval_every=args.eval_every, crash_after_steps=args.crash_after_steps,
    )
    try:
        result = train(cfg)
    except SimulatedCrash as e:
        print(f"effivit train: {e}", flush=True)
        return 3
    if args.result_json and result.get("final") is not None:
        Path(args.result_json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train or fine-tune a model on an image folder",
        description="Train (or fine-tune) a model on DATA/train and validate on DATA/val (class sub-folders). "
                    "Multi-process: torchrun --nproc_per_node=N -m effivit train ...",
    )
    p.add_argument("--model", required=True, help="model name, e.g. nextvit_small (see `effivit list`)")
    p.add_argument("--data", required=True, help="folder with train/ and val/ image folders")
    p.add_argument("--output", default=None, help="run folder (checkpoints, metrics); default runs/<model>")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128, help="global batch (all processes) per optimizer step")
    p.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation micro-steps per step")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    g.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine")
    g.add_argument("--warmup-epochs", type=float, default=1.0)
    g.add_argument("--weight-decay", type=float, default=0.05, help="not applied to norms, biases, tables")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate (default: the model's)")
    g.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this value")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="mixed precision (bf16 on CPU; fp16 or bf16 on CUDA)")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--ema-decay", type=float, default=0.0, help="EMA of weights with this decay (0: off)")
    d = p.add_argument_group("data")
    d.add_argument("--img-size", type=int, default=None, help="training/eval size (default: the model's)")
    d.add_argument("--crop-pct", type=float, default=None, help="eval centre-crop fraction (default: the model's)")
    d.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                   help="random-resized-crop area range")
    d.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    d.add_argument("--randaugment", type=int, nargs=2, default=(2, 9), metavar=("OPS", "MAGNITUDE"),
                   help="RandAugment ops per image and magnitude (0 0: off)")
    d.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    d.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    d.add_argument("--workers", type=int, default=2, help="data loader processes per training process")
    m = p.add_argument_group("model and distillation")
    m.add_argument("--pretrained", default=None, metavar="SRC",
                   help="start from weights: a file or hf-hub: id load_checkpoint accepts, or 'official'; "
                        "a head for another number of classes is replaced")
    _model_args(m)
    m.add_argument("--teacher", default=None, help="teacher model name (enables distillation)")
    m.add_argument("--teacher-checkpoint", default=None, metavar="SRC", help="the teacher's trained weights")
    _model_args(m, "teacher_arg", "--teacher-arg")
    m.add_argument("--distill", choices=("soft", "hard"), default="soft")
    m.add_argument("--distill-tau", type=float, default=1.0, help="soft distillation temperature")
    m.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the distillation term")
    r = p.add_argument_group("run")
    r.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue a run: its last.pt (default: OUTPUT/last.pt)")
    r.add_argument("--overwrite", action="store_true", help="start again in an OUTPUT that holds a run")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    r.add_argument("--no-progress", action="store_true", help="no per-epoch progress bars")
    r.add_argument("--plot", action="store_true", help="write OUTPUT/curves.png (matplotlib) every epoch")
    r.add_argument("--log-interval", type=int, default=0, help="log every n-th step's loss to steps.jsonl")
    r.add_argument("--eval-every", type=int, default=1, help="validate every n epochs (and after the last)")
    r.add_argument("--result-json", default=None, help="write the final summary to this JSON file")
    r.add_argument("--crash-after-steps", type=int, default=None,
                   help="testing: stop abruptly after this many optimizer steps, as a kill would (exit 3)")
    p.set_defaults(func=_cmd_train)


# ---- eval ------------------------------------------------------------------------------------------------
def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import load_checkpoint
    from ..factory import create_model
    from . import checkpointing
    from .data import ImageFolderDataset, find_split
    from .distributed import cleanup, init_distributed
    from .ema import ema_weights
    from .evaluate import evaluate_resolutions
    from .metrics import format_table

    root = Path(args.data)
    try:
        folder = find_split(root, args.split)
    except FileNotFoundError:
        folder = root  # DATA itself holds the class folders
    classes = ImageFolderDataset(folder).classes
    source: Any = args.checkpoint
    if args.ema:
        ckpt = checkpointing.load(args.checkpoint)
        if not ckpt.get("ema"):
            raise ValueError(f"{args.checkpoint} has no EMA weights (the run was trained without --ema-decay)")
        source = ema_weights(ckpt["ema"])
    info = init_distributed(args.device)
    try:
        torch.manual_seed(0)
        model = create_model(args.model, num_classes=len(classes), **dict(args.model_arg))
        if source is not None:
            load_checkpoint(model, source)
        elif info.is_main:
            print("note: no --checkpoint, evaluating random weights")
        model.eval()
        variants = [("unfused", model)]
        if args.fused or args.both:
            from ..deploy import fuse

            fused = fuse(model)
            variants = [("fused", fused)] if args.fused and not args.both else variants + [("fused", fused)]
        rows = []
        for label, m in variants:
            m.to(info.device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
            for r in evaluate_resolutions(m, folder, args.img_size, classes, args.batch_size, args.workers,
                                          args.crop_pct, info.device, args.amp, args.channels_last, info):
                rows.append({"model": args.model, "weights": label, **r})
    finally:
        cleanup(info)
    if info.is_main:
        cols = [("model", "model", "s"), ("weights", "weights", "s"), ("img_size", "img_size", "d"),
                ("crop_pct", "crop_pct", ".3f"), ("top1", "top-1 %", ".2f"), ("top5", "top-5 %", ".2f"),
                ("loss", "loss", ".4f"), ("images", "images", "d"), ("skipped", "skipped", "d")]
        print(format_table(rows, cols))
        if args.output_json:
            Path(args.output_json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="top-1/top-5/loss of a checkpoint on an image folder at one or more resolutions",
        description="Evaluate a model on DATA/val (or DATA itself when it holds class folders) at each --img-size, "
                    "with the model's own mean/std, interpolation and crop_pct.",
    )
    p.add_argument("--model", required=True, help="model name, e.g. nextvit_small")
    p.add_argument("--checkpoint", default=None, metavar="SRC",
                   help="weights: a training checkpoint, .safetensors/.pth file, hf-hub: id")
    p.add_argument("--data", required=True, help="folder with val/ (class sub-folders), or the class folders")
    p.add_argument("--split", default="val", help="sub-folder of DATA to evaluate (default val)")
    p.add_argument("--img-size", type=int, nargs="+", default=[224], metavar="N", help="one or more sizes")
    p.add_argument("--crop-pct", type=float, default=None, help="centre-crop fraction (default: the model's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of a training checkpoint")
    fuse_group = p.add_mutually_exclusive_group()
    fuse_group.add_argument("--fused", action="store_true", help="evaluate the fused model (effivit.deploy.fuse)")
    fuse_group.add_argument("--both", action="store_true", help="evaluate the unfused and the fused model")
    _model_args(p)
    p.add_argument("--output-json", default=None, help="also write the rows as JSON")
    p.set_defaults(func=_cmd_eval)


# ---- data ------------------------------------------------------------------------------------------------
def _cmd_data_digits(args: argparse.Namespace) -> int:
    from .digits import write_digits

    summary = write_digits(args.dir, size=args.size, val_fraction=args.val_fraction,
                           max_per_class=args.max_per_class)
    c = summary["counts"]
    print(f"wrote {c['train']} train and {c['val']} val images ({args.size}x{args.size}, 10 classes) to {args.dir}")
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="write demo data sets", description="Write demo data sets (no download).")
    dsub = p.add_subparsers(dest="data_command", metavar="DATASET", required=True)
    d = dsub.add_parser(
        "digits", help="scikit-learn's handwritten digits (1,797 real 8x8 scans) as an image folder",
        description="Write scikit-learn's handwritten digits as DIR/train/<digit>/*.png and DIR/val/<digit>/*.png "
                    "(fixed stratified split, upscaled).",
    )
    d.add_argument("dir", help="output folder")
    d.add_argument("--size", type=int, default=32, help="image side in pixels (upscaled from 8)")
    d.add_argument("--val-fraction", type=float, default=0.2)
    d.add_argument("--max-per-class", type=int, default=None, help="keep at most this many per class and split")
    d.set_defaults(func=_cmd_data_digits)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``train``, ``eval`` and ``data`` on the ``effivit`` command's sub-parsers."""
    _add_train(sub)
    _add_eval(sub)
    _add_data(sub)
