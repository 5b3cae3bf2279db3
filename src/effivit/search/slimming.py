"""Latency-driven slimming (EfficientFormer, arXiv:2206.01191, section 4.3): from the trained supernet to a
network that meets the latency budget, one action at a time.

Importance. With ``p = softmax(alpha)`` of a MetaPath, its importance is ``p_4D / p_I`` in stages without
MB3D and ``(p_3D + p_4D) / p_I`` where MB3D is allowed (the paper writes the alphas; the ratio of their
softmax probabilities is the same comparison with a well-defined sign). A stage's importance is the sum
over the MetaPaths it still keeps.

Start. Every MetaPath keeps a block at the largest widths; in a stage that allows MB3D the blocks from
position k on are MB3D, with k the split most probable under the alphas (maps first, then tokens).

Actions (each a candidate at every step):

1. ``drop``: the least important kept MetaPath becomes an identity (a stage keeps at least one block);
2. ``to4d``: the first MB3D of a stage becomes an MB4D (the token part starts one block later; the
   paper's "remove the first MB3D"); one candidate per stage that has MB3D blocks;
3. ``narrow``: the least important stage that is wider than the space's minimum loses ``width_step``
   (16) channels.

Each candidate's latency saving comes from the lookup table; its accuracy comes from evaluating the
supernet's weights for that network on held-out training images after recalibrating BatchNorm statistics
(:class:`SupernetEvaluator`). The action with the smallest accuracy drop per millisecond saved is taken
(``objective="mes"``: per gain of EfficientFormerV2's mobile efficiency score, arXiv:2212.08059), until
the predicted latency meets the budget. A budget below the smallest latency the start can reach is an
error naming that latency.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..models.efficientformer_custom import NUM_STAGES, EfficientFormerArch, EfficientFormerCustom
from .space import SearchSpace, Subnet

OBJECTIVES = ("latency", "mes")
# EfficientFormerV2's mobile efficiency score: MES = 100 * prod_i (M_i / U_i) ** -a_i over model size
# (M in millions of parameters, U = 1) and latency (ms, U = 1), with a = 0.5 for both (equally important).
MES_UNITS = {"params_m": 1.0, "latency_ms": 1.0}
MES_EXPONENTS = {"params_m": 0.5, "latency_ms": 0.5}


class BudgetError(ValueError):
    """The latency budget cannot be met in this space on this machine."""


def mes(params_m: float, latency_ms: float) -> float:
    """EfficientFormerV2's mobile efficiency score (higher: smaller and faster)."""
    score = 100.0
    for name, value in (("params_m", params_m), ("latency_ms", latency_ms)):
        score *= (max(value, 1e-9) / MES_UNITS[name]) ** -MES_EXPONENTS[name]
    return score


def count_params(arch: EfficientFormerArch, num_classes: int) -> int:
    """Parameters of the network (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        model = EfficientFormerCustom(arch, num_classes=num_classes)
    return sum(p.numel() for p in model.parameters())


# ---- importance and actions -----------------------------------------------------------------------------
def importance(probs: Sequence[Sequence[dict[str, float]]]) -> list[list[float]]:
    """Per MetaPath: ``(p_4D + p_3D) / p_I`` (``p_3D = 0`` where MB3D is not a choice)."""
    return [[(p["4d"] + p.get("3d", 0.0)) / max(p["id"], 1e-12) for p in stage] for stage in probs]


def initial_subnet(space: SearchSpace, probs: Sequence[Sequence[dict[str, float]]]) -> Subnet:
    """Every MetaPath kept, largest widths; where MB3D is allowed, the most probable maps-then-tokens split."""
    choices = []
    for i, stage in enumerate(probs):
        n = len(stage)
        if "3d" not in space.kinds(i):
            choices.append(("4d",) * n)
            continue
        log4 = [math.log(max(p["4d"], 1e-12)) for p in stage]
        log3 = [math.log(max(p["3d"], 1e-12)) for p in stage]
        # k = number of MB3D blocks at the end; ties go to fewer MB3D blocks.
        best = max(range(n + 1), key=lambda k: (sum(log4[: n - k]) + sum(log3[n - k:]), -k))
        choices.append(("4d",) * (n - best) + ("3d",) * best)
    return Subnet(space.max_widths, tuple(choices))


@dataclass(frozen=True)
class Action:
    kind: str  # drop | to4d | narrow
    stage: int
    index: int  # the MetaPath (drop, to4d) or -1 (narrow)
    subnet: Subnet

    @property
    def text(self) -> str:
        if self.kind == "drop":
            return f"drop stage {self.stage + 1} block {self.index + 1}"
        if self.kind == "to4d":
            return f"stage {self.stage + 1} block {self.index + 1}: MB3D -> MB4D"
        return f"narrow stage {self.stage + 1} to {self.subnet.widths[self.stage]}"


def actions(space: SearchSpace, subnet: Subnet, imp: Sequence[Sequence[float]]) -> list[Action]:
    """The candidate actions from ``subnet`` (see the module docstring); ties go to the earlier position."""
    out = []
    droppable = [(imp[i][j], i, j) for i in range(NUM_STAGES) if len(subnet.kept(i)) > 1 for j in subnet.kept(i)]
    if droppable:
        _, i, j = min(droppable)
        out.append(Action("drop", i, j, subnet.replace_choice(i, j, "id")))
    for i in range(NUM_STAGES):
        if "3d" in subnet.choices[i]:
            j = subnet.choices[i].index("3d")
            out.append(Action("to4d", i, j, subnet.replace_choice(i, j, "4d")))
    narrowable = [(sum(imp[i][j] for j in subnet.kept(i)), i) for i in range(NUM_STAGES)
                  if subnet.widths[i] - space.width_step >= space.min_width]
    if narrowable:
        _, i = min(narrowable)
        out.append(Action("narrow", i, -1, subnet.replace_width(i, subnet.widths[i] - space.width_step)))
    return out


# ---- the loop -------------------------------------------------------------------------------------------
def slim(
    space: SearchSpace,
    probs: Sequence[Sequence[dict[str, float]]],
    latency: Callable[[EfficientFormerArch], float],
    evaluate: Callable[[Subnet], float],
    budget_ms: float,
    smallest_ms: float,
    objective: str = "latency",
    num_classes: int = 1000,
    state_path: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Slim from the start network until ``latency(arch) <= budget_ms``; returns one row per step (step 0:
    the start), each with the action, predicted latency, parameters, MES, held-out top-1 and the
    candidates considered. ``evaluate(subnet)`` returns held-out top-1 (%). With ``state_path`` the rows
    are written after every step and an interrupted run continues from them."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not supported; allowed: {OBJECTIVES}")
    if not budget_ms > 0:
        raise ValueError(f"the latency budget must be > 0 ms, got {budget_ms}")
    imp = importance(probs)
    start = initial_subnet(space, probs)
    if budget_ms < smallest_ms:
        raise BudgetError(f"a budget of {budget_ms:g} ms is below the smallest latency this search space reaches "
                          f"on this machine ({smallest_ms:.3f} ms: one block per stage at width "
                          f"{space.min_width}); raise --budget-ms to at least {smallest_ms:.3f}")
    cache: dict[str, float] = {}

    def point(subnet: Subnet) -> dict[str, Any]:
        arch = space.arch_of(subnet)
        params_m = count_params(arch, num_classes) / 1e6
        ms = latency(arch)
        return {"subnet": subnet.to_dict(), "arch": arch.describe(), "pred_ms": ms, "params_m": params_m,
                "mes": mes(params_m, ms)}

    def top1(subnet: Subnet) -> float:
        k = subnet.key()
        if k not in cache:
            cache[k] = float(evaluate(subnet))
        return cache[k]

    header = {"budget_ms": budget_ms, "objective": objective, "space": space.to_dict(), "start": start.to_dict()}
    rows: list[dict[str, Any]] = []
    path = Path(state_path) if state_path is not None else None
    if path is not None and path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("header") == header:
            rows = saved["steps"]
            log(f"slimming: resumed after step {rows[-1]['step']} from {path}")
    if not rows:
        rows.append({"step": 0, "action": "start", "text": "supernet, every block kept", **point(start),
                     "top1": top1(start), "candidates": []})
        _save(path, header, rows)
        log(_row_line(rows[-1]))
    current = Subnet.from_dict(rows[-1]["subnet"])
    while rows[-1]["pred_ms"] > budget_ms:
        cur = rows[-1]
        scored = []
        for act in actions(space, current, imp):
            cand = point(act.subnet)
            gain = (cur["pred_ms"] - cand["pred_ms"]) if objective == "latency" else (cand["mes"] - cur["mes"])
            if gain <= 0:
                scored.append({"action": act.kind, "text": act.text, "gain": gain, "skipped": "no gain"})
                continue
            acc = top1(act.subnet)
            drop = cur["top1"] - acc
            scored.append({"action": act.kind, "text": act.text, "gain": gain, "top1": acc, "drop": drop,
                           "score": drop / gain, "point": cand, "subnet_obj": act.subnet})
        usable = [c for c in scored if "score" in c]
        if not usable:
            raise BudgetError(f"slimming stopped at {cur['pred_ms']:.3f} ms ({cur['arch']}): no action saves "
                              f"latency any more; the budget of {budget_ms:g} ms is out of reach (smallest "
                              f"reachable: {smallest_ms:.3f} ms)")
        best = min(usable, key=lambda c: (c["score"], -c["gain"]))
        current = best["subnet_obj"]
        candidates = [{k: v for k, v in c.items() if k not in ("point", "subnet_obj")} for c in scored]
        rows.append({"step": cur["step"] + 1, "action": best["action"], "text": best["text"], **best["point"],
                     "top1": best["top1"], "candidates": candidates})
        _save(path, header, rows)
        log(_row_line(rows[-1]))
    return rows


def _row_line(row: dict[str, Any]) -> str:
    return (f"slimming step {row['step']}: {row['text']:38s} predicted {row['pred_ms']:7.3f} ms  "
            f"{row['params_m']:6.3f}M params  held-out top-1 {row['top1']:6.2f}%  [{row['arch']}]")


def _save(path: Path | None, header: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"header": header, "steps": rows}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---- evaluating a path of the supernet ------------------------------------------------------------------
@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """Replace every BatchNorm's running statistics by their exact average over ``batches`` (the path's own
    statistics: the supernet's were accumulated over many paths and widths)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    was_training = model.training
    model.train()
    for x in batches:
        model(x)
    model.train(was_training)
    for m, mom in zip(bns, momenta):
        m.momentum = mom


class SupernetEvaluator:
    """Held-out top-1 of a supernet path: its weights in an ``efficientformer_custom`` network, BatchNorm
    recalibrated on ``calib_images`` training images (the supernet's part, eval preprocessing), then
    evaluated on the held-out images."""

    def __init__(self, supernet, data, calib_images: int = 256, batch_size: int = 64, workers: int = 0,
                 device: torch.device | None = None) -> None:
        from torch.utils.data import DataLoader, Subset

        from ..train.data import ImageFolderDataset, collate_skipping, eval_loader, eval_transform, find_split

        self.supernet = supernet
        self.device = device or next(supernet.parameters()).device
        ds = ImageFolderDataset(find_split(data.root, "train"), eval_transform(data.data_cfg), data.classes)
        g = torch.Generator().manual_seed(0)
        order = [data.train_idx[k] for k in torch.randperm(len(data.train_idx), generator=g).tolist()]
        calib = Subset(ds, order[: max(1, calib_images)])
        self.calib = []
        for batch in DataLoader(calib, batch_size=batch_size, num_workers=workers, collate_fn=collate_skipping):
            if batch.images is not None:
                self.calib.append(batch.images.to(self.device))
        self.loader = eval_loader(Subset(ds, data.holdout_idx), batch_size, workers)

    def __call__(self, subnet: Subnet) -> float:
        from ..train.evaluate import evaluate
        from .supernet import extract_subnet

        model = extract_subnet(self.supernet, subnet)
        recalibrate_batchnorm(model, self.calib)
        return evaluate(model, self.loader, self.device)["top1"]
