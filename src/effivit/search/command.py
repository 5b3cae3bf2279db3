"""``effivit search``: table, supernet, slimming, report; and ``effivit search --predict ARCH``.

Registered by ``effivit.cli.build_parser`` through :func:`add_parser`. Every phase resumes: the latency
table is saved after each group of entries, the supernet after each epoch, slimming after each step;
running the same command again continues where it stopped (and with another ``--budget-ms`` reuses the
table and the supernet). ``torchrun --nproc_per_node=N -m effivit search ...`` trains the supernet on N
processes; the table must then exist already (build it on the target device with ``--stop-after table``:
N processes would disturb each other's timings).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from .slimming import OBJECTIVES


def _space(args: argparse.Namespace):
    from dataclasses import replace

    from .space import SPACES

    space = SPACES[args.space]
    changes: dict[str, Any] = {}
    for flag in ("max_widths", "max_depths", "mb3d_stages", "min_width", "width_step", "img_size", "key_dim",
                 "num_heads", "attn_ratio", "mlp_ratio"):
        value = getattr(args, flag)
        if value is not None:
            changes[flag] = tuple(value) if isinstance(value, list) else value
    return replace(space, **changes) if changes else space


def _settings(args: argparse.Namespace):
    from .measure import MeasureSettings

    return MeasureSettings(runtime=args.runtime, precision=args.precision, threads=args.threads,
                           batch_size=args.table_batch_size, clock=args.clock, sample_ms=args.sample_ms,
                           rounds=args.rounds)


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed (its non-default options), for the report."""
    parser: argparse.ArgumentParser = args._parser
    parts = ["effivit", "search"]
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help",):
            continue
        value = getattr(args, action.dest, None)
        if value == action.default or value is None:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, *(str(v) for v in value)]
        else:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def _table_bar(enabled: bool):
    from tqdm.auto import tqdm

    state: dict[str, Any] = {}

    def progress(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, desc="latency table", unit="entry", disable=None if enabled else True,
                                file=sys.stderr, dynamic_ncols=True, leave=False)
        bar = state["bar"]
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return progress


def _load_or_build_table(args, space, settings, num_classes: int, out: Path, info) -> Any:
    from .latency import LatencyTable, TableError, build_table

    path = Path(args.table) if args.table else out / "latency_table.json"
    table = None
    if path.is_file() and not args.rebuild_table:
        table = LatencyTable.load(path)
        why = table.mismatch(space, settings, num_classes)
        if why:
            raise TableError(f"{path} does not fit this search ({why}); pass --rebuild-table to measure a new "
                             f"one, or another --table/--out")
        if table.complete:
            print(f"latency table: {path} ({len(table.entries)} entries, {table.settings.label}, measured "
                  f"{table.created})")
            return table
    if info.distributed:
        raise TableError(f"no complete latency table at {path}: build it first on the target device, with one "
                         f"process (effivit search --stop-after table ...); N training processes would disturb "
                         f"each other's timings")
    if table is not None and table.space != space:
        space = table.space  # finish the table for the space it was started for
    print(f"latency table: measuring {space.img_size} px ops in {settings.label} -> {path}", flush=True)
    table = build_table(space, settings, num_classes, path, resume=not args.rebuild_table,
                        progress=_table_bar(not args.no_progress))
    print(f"latency table: {len(table.entries)} entries, per-call overhead {table.overhead_ms:.4f} ms, "
          f"network/op-sum scale {table.scale:.3f}", flush=True)
    return table


def _predict(args: argparse.Namespace) -> int:
    from ..models.efficientformer_custom import EfficientFormerArch
    from .latency import LatencyTable, measure_networks

    if not args.table and not args.out:
        raise ValueError("--predict needs a latency table: --table PATH (or --out DIR holding latency_table.json)")
    table = LatencyTable.load(args.table or Path(args.out) / "latency_table.json")
    arch = EfficientFormerArch.load(args.predict)
    predicted = table.predict(arch)
    print(f"{arch.describe()}  ({table.settings.label}, table of {table.created})")
    if args.verbose:
        for key, ms in table.breakdown(arch):
            print(f"  {key:24s} {ms * table.scale:8.4f} ms")
        print(f"  {'per-call overhead':24s} {table.overhead_ms:8.4f} ms")
    measured = measure_networks({"net": arch}, table.settings, table.num_classes)["net"]
    err = 100.0 * (predicted - measured.median_ms) / measured.median_ms
    print(f"predicted {predicted:.3f} ms  measured {measured.median_ms:.3f} ms (IQR {measured.q1_ms:.3f}-"
          f"{measured.q3_ms:.3f})  error {err:+.1f}%")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    if args.predict:
        return _predict(args)
    if not args.out:
        raise ValueError("--out DIR is required (the table, the supernet and the results go there)")
    if args.stop_after != "table" and not args.data:
        raise ValueError("--data DIR is required (an image folder with train/<class>/...)")
    if args.stop_after is None and args.budget_ms is None:
        raise ValueError("--budget-ms is required (the latency the searched network must meet)")

    import torch

    from ..train.distributed import cleanup, init_distributed
    from .latency import smallest_latency
    from .slimming import BudgetError
    from .supernet import SupernetConfig, search_data, train_supernet

    space = _space(args)
    settings = _settings(args)
    out = Path(args.out)
    info = init_distributed(args.device)
    try:
        data = search_data(args.data, space, args.holdout, args.crop_pct, args.seed) if args.data else None
        num_classes = len(data.classes) if data is not None else args.num_classes
        table = _load_or_build_table(args, space, settings, num_classes, out, info)
        if args.budget_ms is not None:
            floor, arch = smallest_latency(table)
            if args.budget_ms < floor:
                raise BudgetError(f"a budget of {args.budget_ms:g} ms is below the smallest latency this search "
                                  f"space reaches on this machine ({floor:.3f} ms, {arch.describe()}, "
                                  f"{table.settings.label}); raise --budget-ms to at least {floor:.3f}")
        if args.stop_after == "table":
            return 0
        cfg = SupernetConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
            warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay, smoothing=args.smoothing,
            alpha_lr=args.alpha_lr, tau_max=args.tau_max, tau_min=args.tau_min, arch_warmup=args.arch_warmup,
            full_width_prob=args.full_width_prob, sample_widths=not args.no_width_sampling,
            crop_pct=args.crop_pct, scale=tuple(args.scale), hflip=args.hflip,
            randaugment=None if args.randaugment[0] == 0 else tuple(args.randaugment), amp=args.amp,
            workers=args.workers, seed=args.seed, device=args.device, progress=not args.no_progress)
        supernet = train_supernet(space, data, cfg, out / "supernet", log=lambda m: print(m, flush=True)
                                  if info.is_main else None)
        if args.stop_after == "supernet" or not info.is_main:
            return 0
        _slim_and_report(args, space, table, supernet, data, out, torch.device(info.device))
    finally:
        cleanup(info)
    return 0


def _slim_and_report(args, space, table, supernet, data, out: Path, device) -> None:
    from ..bench.machine import machine_line
    from ..train import checkpointing
    from .latency import measure_networks, smallest_latency
    from .report import write_report
    from .slimming import SupernetEvaluator, initial_subnet, slim
    from .space import Subnet
    from .supernet import extract_subnet

    probs = supernet.probabilities()
    start = initial_subnet(space, probs)
    floor, _ = smallest_latency(table, [i for i, ch in enumerate(start.choices) if "3d" in ch])
    folder = out / f"budget-{args.budget_ms:g}ms"
    evaluator = SupernetEvaluator(supernet, data, args.calib_images, args.eval_batch_size, args.workers, device)
    rows = slim(space, probs, table.predict, evaluator, args.budget_ms, floor, args.objective, len(data.classes),
                folder / "slimming.json", log=lambda m: print(m, flush=True))
    final = Subnet.from_dict(rows[-1]["subnet"])
    command = _command_line(args)
    meta = {"searched_by": command, "budget_ms": args.budget_ms, "runtime": table.settings.label,
            "predicted_ms": rows[-1]["pred_ms"], "holdout_top1_supernet": rows[-1]["top1"],
            "classes": data.classes}
    arch = space.arch_of(final, meta)
    arch_file = arch.save(folder / "arch.json")
    model = extract_subnet(supernet, final, meta).cpu()
    from .slimming import recalibrate_batchnorm

    recalibrate_batchnorm(model, [x.cpu() for x in evaluator.calib])
    weights = checkpointing.save_atomic(model.state_dict(), folder / "supernet_weights.pt")
    measured = measure_networks({"net": arch}, table.settings, len(data.classes))["net"].median_ms
    base = (f"effivit train --model efficientformer_custom --model-arg arch={arch_file} --data {args.data} "
            f"--img-size {space.img_size} --epochs 30")
    info = {
        "command": command, "budget_ms": args.budget_ms, "objective": args.objective,
        "machine": machine_line(table.machine), "runtime": table.settings.label, "table": str(args.table or
        out / "latency_table.json"), "table_entries": len(table.entries), "table_scale": table.scale,
        "measured_ms": measured, "arch_file": str(arch_file), "arch": arch.to_dict(), "weights": str(weights),
        "num_classes": len(data.classes), "steps": rows,
        "train_scratch": base, "train_supernet": f"{base} --pretrained {weights}",
    }
    report = write_report(folder, info)
    print(f"search done: {rows[-1]['arch']}  predicted {rows[-1]['pred_ms']:.3f} ms, measured {measured:.3f} ms "
          f"({len(rows) - 1} slimming steps)\n  architecture: {arch_file}\n  report: {report}\n  train it: {base}",
          flush=True)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from .measure import CLOCKS, precisions, runtimes
    from .space import SPACES

    p = sub.add_parser(
        "search", help="design an EfficientFormer for this machine and a latency budget (latency-driven slimming)",
        description="EfficientFormer's latency-driven slimming (arXiv:2206.01191): measure a latency table on "
                    "this machine, train a supernet once on DATA, slim it until the predicted latency meets "
                    "--budget-ms, and write an architecture file for create_model('efficientformer_custom', "
                    "arch=PATH). Each phase resumes. --predict ARCH predicts and measures a network instead.",
    )
    p.add_argument("--data", default=None, help="image folder with train/<class>/... (val/ is not used)")
    p.add_argument("--budget-ms", type=float, default=None, metavar="MS", help="latency budget of the result")
    p.add_argument("--out", default=None, metavar="DIR", help="latency_table.json, supernet/, budget-<MS>ms/")
    p.add_argument("--objective", choices=OBJECTIVES, default="latency",
                   help="rank actions by top-1 drop per ms saved, or per EfficientFormerV2 MES gained")
    p.add_argument("--stop-after", choices=("table", "supernet"), default=None, help="stop after this phase")
    p.add_argument("--predict", default=None, metavar="ARCH",
                   help="print the predicted and the measured latency of an architecture file and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="--predict: show every op's share")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    m = p.add_argument_group("latency (the table)")
    m.add_argument("--runtime", choices=runtimes(), default="eager",
                   help="runtime the latency is for (effivit.bench.backends; default eager)")
    m.add_argument("--precision", choices=precisions(), default="fp32",
                   help="precision the latency is for (int8: calibrated on synthetic images; default fp32)")
    m.add_argument("--threads", type=int, default=None, help="threads (default: torch's)")
    m.add_argument("--clock", choices=CLOCKS, default="wall",
                   help="wall clock, or this thread's CPU time (one thread; on a machine shared with other jobs)")
    m.add_argument("--table", default=None, metavar="PATH", help="latency table file (default OUT/latency_table.json)")
    m.add_argument("--rebuild-table", action="store_true", help="measure the table again")
    m.add_argument("--table-batch-size", type=int, default=1, help="batch size the latency is for")
    m.add_argument("--sample-ms", type=float, default=10.0, help="length of one timed burst of calls")
    m.add_argument("--rounds", type=int, default=5, help="paired rounds per table group")
    m.add_argument("--num-classes", type=int, default=1000, help="classifier size without --data (table only)")
    s = p.add_argument_group("search space")
    s.add_argument("--space", choices=sorted(SPACES), default="imagenet", help="preset (fields below override it)")
    s.add_argument("--img-size", type=int, default=None, help="input size the network is designed for")
    s.add_argument("--max-widths", type=int, nargs=4, default=None, metavar="C")
    s.add_argument("--max-depths", type=int, nargs=4, default=None, metavar="N")
    s.add_argument("--mb3d-stages", type=int, nargs="*", default=None, metavar="I",
                   help="0-based stages whose blocks may be MB3D (default 2 3)")
    s.add_argument("--min-width", type=int, default=None)
    s.add_argument("--width-step", type=int, default=None)
    s.add_argument("--key-dim", type=int, default=None)
    s.add_argument("--num-heads", type=int, default=None)
    s.add_argument("--attn-ratio", type=float, default=None)
    s.add_argument("--mlp-ratio", type=float, default=None)
    t = p.add_argument_group("supernet training")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=128, help="global batch (all processes)")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--min-lr", type=float, default=1e-5)
    t.add_argument("--warmup-epochs", type=float, default=1.0)
    t.add_argument("--weight-decay", type=float, default=0.05)
    t.add_argument("--smoothing", type=float, default=0.1)
    t.add_argument("--alpha-lr", type=float, default=3e-3, help="Adam learning rate of the architecture parameters")
    t.add_argument("--tau-max", type=float, default=5.0, help="Gumbel-Softmax temperature at the start")
    t.add_argument("--tau-min", type=float, default=0.5, help="... at the end (annealed exponentially)")
    t.add_argument("--arch-warmup", type=float, default=0.2, help="fraction of epochs with alpha frozen")
    t.add_argument("--full-width-prob", type=float, default=0.25, help="probability of a full-width step")
    t.add_argument("--no-width-sampling", action="store_true", help="train at full width only")
    t.add_argument("--crop-pct", type=float, default=0.95)
    t.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"))
    t.add_argument("--hflip", type=float, default=0.5)
    t.add_argument("--randaugment", type=int, nargs=2, default=(2, 9), metavar=("OPS", "MAGNITUDE"))
    t.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    t.add_argument("--workers", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    e = p.add_argument_group("slimming")
    e.add_argument("--holdout", type=float, default=0.1, help="fraction of DATA/train held out for slimming")
    e.add_argument("--calib-images", type=int, default=256, help="images that recalibrate BatchNorm per candidate")
    e.add_argument("--eval-batch-size", type=int, default=64)
    p.set_defaults(func=_cmd_search, _parser=p)
