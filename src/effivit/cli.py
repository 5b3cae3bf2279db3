"""``effivit`` / ``python -m effivit``: list models, benchmark them, export them, train and evaluate."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_list(args: argparse.Namespace) -> int:
    from .registry import get_entry, list_models

    names = list_models(args.pattern or "", family=args.family, pretrained=args.pretrained)
    if not names:
        print(f"no models match {args.pattern!r}", file=sys.stderr)
        return 1
    for name in names:
        if args.verbose:
            cfg = get_entry(name).pretrained_cfg(name.partition(".")[2] or None)
            pub = cfg.get("published")
            top1 = f"{pub['top1']:.2f}" if pub is not None and pub["top1"] is not None else "-"
            size = "x".join(str(s) for s in cfg["input_size"][1:])
            print(f"{name:40s} {cfg['family']:20s} {size:>9s}  top1={top1}")
        else:
            print(name)
    return 0


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list registered models", description="List registered models.")
    p.add_argument("pattern", nargs="?", default="", help="glob pattern, e.g. 'nextvit*'")
    p.add_argument("--family", default=None, help="only this family (e.g. nextvit)")
    p.add_argument("--pretrained", action="store_true", help="list released weights (arch.tag)")
    p.add_argument("-v", "--verbose", action="store_true", help="show family, input size and top-1")
    p.set_defaults(func=_cmd_list)


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from . import create_model
    from .deploy import fuse
    from .deploy.export import export

    if args.unfused and args.precision != "fp32":
        raise ValueError("--unfused exports the training form in fp32 only")
    torch.manual_seed(0)
    kwargs = {"attn": args.attn} if args.attn else {}
    for item in args.model_arg or ():
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--model-arg {item!r} must be KEY=VALUE")
        from .bench.specs import _parse_value

        kwargs[key] = _parse_value(value)
    model = create_model(args.model, pretrained=args.checkpoint or False, **kwargs).eval()
    if not args.unfused:
        model = fuse(model)
    onnx_kwargs = {"opset": args.opset, "exporter": args.exporter} if args.target == "onnx" else {}
    result = export(model, args.output, target=args.target, precision=args.precision, img_size=args.img_size,
                    calibration=args.calibration, dynamic_batch=not args.static_batch, **onnx_kwargs)
    print(result.summary() + ("" if not args.unfused else " (unfused training form)"))
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    from .deploy.export import TARGETS

    p = sub.add_parser(
        "export", help="export a model to ONNX, OpenVINO or TorchScript at fp32/bf16/fp16/int8 (fused, verified)",
        description="Export a model (fused by default) at a precision and verify the artifact against the fused "
                    "PyTorch fp32 model (tolerance declared per precision). Offered: "
                    + "; ".join(f"{t}: {', '.join(p)}" for t, p in TARGETS.items()) + ".",
    )
    p.add_argument("model", help="model name, e.g. nextvit_small")
    p.add_argument("output", help="output file (.onnx, .xml for OpenVINO IR, or .pt)")
    p.add_argument("--target", "--format", dest="target", choices=sorted(TARGETS), default="onnx",
                   help="artifact kind (default onnx; --format is the old name)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16", "int8"), default="fp32",
                   help="fp32 (default); bf16/fp16: half-precision weights (torchscript) or inference precision "
                        "(openvino); int8: static post-training quantization (onnx: ONNX Runtime QDQ, openvino: NNCF)")
    p.add_argument("--calibration", default=None, metavar="DIR",
                   help="images for int8 calibration and for the check (default: synthetic inputs, accuracy unknown)")
    p.add_argument("--img-size", type=int, nargs="+", default=[224], metavar="N",
                   help="input size: one value (square) or H W")
    p.add_argument("--checkpoint", default=None, help="weights: path, hf-hub:org/name, or omit for random")
    p.add_argument("--attn", default=None, help="Next-ViT attention kind (original, bchw, xca)")
    p.add_argument("--model-arg", action="append", default=None, metavar="KEY=VALUE",
                   help="constructor argument (repeatable), e.g. num_classes=10")
    p.add_argument("--unfused", action="store_true", help="export the training form (no BN folding)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch dimension to 1 (ONNX)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                   help="ONNX exporter (torch.export based, or the tracing exporter)")
    p.set_defaults(func=_cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effivit", description="Efficient vision transformers built for deployment."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_list(sub)
    _add_export(sub)
    # Sub-commands that live with their subsystem register themselves here.
    from .bench.command import add_parser as add_bench

    add_bench(sub)
    from .train.command import add_parsers as add_train

    add_train(sub)
    from .search.command import add_parser as add_search

    add_search(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "img_size", None) is not None and args.command == "export":
        if len(args.img_size) not in (1, 2):
            parser.error("--img-size takes one value (square) or two (H W)")
        args.img_size = args.img_size[0] if len(args.img_size) == 1 else tuple(args.img_size)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into `head` and closed early: not an error
        sys.stderr.close()
        return 0
    except OSError as e:  # unwritable or missing paths: name the path, one line
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"effivit {args.command}: error:{where} {e.strerror or e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, TypeError, ImportError) as e:
        message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message
        print(f"effivit {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
