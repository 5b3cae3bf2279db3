"""The latency lookup table: every block of the search space measured on this machine, and the predictor
built on it (EfficientFormer, arXiv:2206.01191, section 4.3).

A network of the space is a sequence of *ops*; each op's latency depends only on its kind, width(s) and
resolution, so a table of all of them predicts any network of the space by summation:

==========  ==========================  ====================================================================
key         op                          input
==========  ==========================  ====================================================================
stem/C@S    two stride-2 Conv-BN-ReLU   (B, 3, S, S) image (converted to channels_last, as the fused model)
down/A-C@R  stride-2 Conv-BN            (B, A, 2R, 2R) map of the previous stage
mb4d/C@R    MB4D block                  (B, C, R, R) map
mb3d/C@R    MB3D block                  (B, R, R, C) tokens
flat/C@R    maps -> tokens              (B, C, R, R) map
tomaps/C@R  tokens -> maps              (B, R, R, C) tokens (a stage ending in MB3D that is not the last)
head4d/C@R  BatchNorm, pool, Linear     (B, C, R, R) map
head3d/C@R  LayerNorm, pool, Linear     (B, R, R, C) tokens
==========  ==========================  ====================================================================

Every op is measured in its deploy form (``effivit.deploy.fuse``; channels_last maps in eager, as the
fused model runs) with random weights. An isolated call pays the runtime's per-call overhead (Python
dispatch, ``session.run``, input copies) which a whole network pays once: the table also measures
that overhead (:class:`~effivit.search.measure.NullOp`). And a module timed alone, call after call, runs
with its code and data hot, which it does not inside a network: after the entries the table measures a
few random networks of the space whole and stores the median ratio of network to op sum (``scale``).
A prediction is ``overhead + scale * sum(entry - overhead)``.

The table is a versioned JSON file recording the machine, the runtime, precision, threads, batch size,
the space and the number of classes; it is written after every group of entries, so an interrupted build
resumes where it stopped, and it is rebuilt only when asked.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bench.machine import machine_info
from ..bench.timing import Timing
from ..deploy import fuse
from ..models.efficientformer import Flat
from ..models.efficientformer_custom import (
    NUM_STAGES,
    EfficientFormerArch,
    StageArch,
    ToMaps,
    make_block,
    make_downsample,
    make_stem,
)
from .measure import MeasureSettings, NullOp, measure_modules, null_example
from .space import SearchSpace

TABLE_FORMAT = "effivit-latency-table"
TABLE_VERSION = 1
GROUP = 8  # entries timed together in one paired call (and saved after)


class TableError(ValueError):
    """A latency table that cannot serve this request (other space, runtime, machine; missing entries)."""


# ---- the ops of a network ----------------------------------------------------------------------------
def arch_keys(arch: EfficientFormerArch) -> list[str]:
    """The table keys of ``arch``'s ops, in execution order."""
    keys = [f"stem/{arch.widths[0]}@{arch.img_size}"]
    prev = arch.widths[0]
    for i, s in enumerate(arch.stages):
        r = arch.resolution(i)
        if i > 0:
            keys.append(f"down/{prev}-{s.width}@{r}")
        for j, kind in enumerate(s.blocks):
            if kind == "3d" and (j == 0 or s.blocks[j - 1] == "4d"):
                keys.append(f"flat/{s.width}@{r}")
            keys.append(f"mb{kind}/{s.width}@{r}")
        if s.blocks[-1] == "3d" and i < NUM_STAGES - 1:
            keys.append(f"tomaps/{s.width}@{r}")
        prev = s.width
    last = arch.stages[-1]
    keys.append(f"head{'3d' if last.blocks[-1] == '3d' else '4d'}/{last.width}@{arch.resolution(NUM_STAGES - 1)}")
    return keys


def space_keys(space: SearchSpace) -> list[str]:
    """Every key a network of ``space`` can use (what the table holds)."""
    keys = [f"stem/{w}@{space.img_size}" for w in space.widths(0)]
    for i in range(NUM_STAGES):
        r = space.resolution(i)
        if i > 0:
            keys += [f"down/{a}-{c}@{r}" for a in space.widths(i - 1) for c in space.widths(i)]
        keys += [f"mb4d/{c}@{r}" for c in space.widths(i)]
        if i in space.mb3d_stages:
            keys += [f"flat/{c}@{r}" for c in space.widths(i)] + [f"mb3d/{c}@{r}" for c in space.widths(i)]
            if i < NUM_STAGES - 1:
                keys += [f"tomaps/{c}@{r}" for c in space.widths(i)]
    r = space.resolution(NUM_STAGES - 1)
    keys += [f"head4d/{c}@{r}" for c in space.widths(NUM_STAGES - 1)]
    if NUM_STAGES - 1 in space.mb3d_stages:
        keys += [f"head3d/{c}@{r}" for c in space.widths(NUM_STAGES - 1)]
    return keys


class _Stem(nn.Module):
    """The stem as the fused model runs it: the input converted to channels_last first."""

    def __init__(self, stem: nn.Module, channels_last: bool) -> None:
        super().__init__()
        self.stem = stem
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.stem(x)


class _Head(nn.Module):
    """Final norm, global average pool and the (merged) classifier: the model's tail after its last stage."""

    def __init__(self, width: int, num_classes: int, tokens: bool) -> None:
        super().__init__()
        self.tokens = tokens
        self.norm = nn.LayerNorm(width) if tokens else nn.BatchNorm2d(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.head(x.mean((1, 2)) if self.tokens else x.mean((2, 3)))


def _parse(key: str) -> tuple[str, list[int], int]:
    kind, _, rest = key.partition("/")
    dims, _, res = rest.partition("@")
    return kind, [int(v) for v in dims.split("-")], int(res)


def build_op(key: str, space: SearchSpace, num_classes: int, batch_size: int,
             channels_last: bool) -> tuple[nn.Module, torch.Tensor]:
    """The deploy-form module of a table key and an example input of the shape it meets in the network."""
    kind, dims, r = _parse(key)
    arch = space.arch_of(space.largest())  # carries the block hyper-parameters
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    b = batch_size
    if kind == "stem":
        module: nn.Module = _Stem(make_stem(3, dims[0]), channels_last)
        return fuse(module).to(memory_format=fmt), torch.randn(b, 3, r, r)
    if kind == "down":
        module, x = make_downsample(dims[0], dims[1]), torch.randn(b, dims[0], 2 * r, 2 * r)
    elif kind == "mb4d":
        module, x = make_block("4d", dims[0], r, arch), torch.randn(b, dims[0], r, r)
    elif kind == "mb3d":
        return fuse(make_block("3d", dims[0], r, arch)), torch.randn(b, r, r, dims[0])
    elif kind == "flat":
        module, x = Flat(), torch.randn(b, dims[0], r, r)
    elif kind == "tomaps":
        return ToMaps(), torch.randn(b, r, r, dims[0])
    elif kind in ("head4d", "head3d"):
        tokens = kind == "head3d"
        module = _Head(dims[0], num_classes, tokens)
        if tokens:
            return fuse(module), torch.randn(b, r, r, dims[0])
        x = torch.randn(b, dims[0], r, r)
    else:
        raise TableError(f"unknown latency-table key {key!r}")
    return fuse(module).to(memory_format=fmt), x.contiguous(memory_format=fmt)


# ---- the table ---------------------------------------------------------------------------------------
class LatencyTable:
    """Measured op latencies (ms) for one space, runtime, precision and machine; predicts networks."""

    def __init__(self, space: SearchSpace, settings: MeasureSettings, num_classes: int,
                 entries: dict[str, dict[str, float]] | None = None, overhead_ms: float | None = None,
                 machine: dict[str, Any] | None = None, created: str = "",
                 calibration: dict[str, Any] | None = None) -> None:
        self.space, self.settings, self.num_classes = space, settings, num_classes
        self.entries: dict[str, dict[str, float]] = dict(entries or {})
        self.overhead_ms = overhead_ms
        self.calibration: dict[str, Any] = dict(calibration or {})
        self.machine = machine or machine_info()
        self.created = created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    # -- prediction -----------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return (self.overhead_ms is not None and all(k in self.entries for k in space_keys(self.space))
                and bool(self.calibration))

    def check_arch(self, arch: EfficientFormerArch) -> None:
        why = self.space.contains_arch(arch)
        if why:
            raise TableError(f"this latency table cannot predict {arch.describe()}: {why}")
        missing = [k for k in arch_keys(arch) if k not in self.entries]
        if missing or self.overhead_ms is None:
            raise TableError(f"the latency table is incomplete: {len(missing)} entries missing "
                             f"(e.g. {missing[:3]}); finish it (run the search again) or rebuild it")

    def breakdown(self, arch: EfficientFormerArch) -> list[tuple[str, float]]:
        """(key, latency without the per-call overhead) for every op of ``arch``."""
        self.check_arch(arch)
        return [(k, max(0.0, self.entries[k]["ms"] - self.overhead_ms)) for k in arch_keys(arch)]

    def op_sum(self, arch: EfficientFormerArch) -> float:
        """The sum of ``arch``'s op latencies, each without the per-call overhead."""
        return sum(v for _, v in self.breakdown(arch))

    def predict(self, arch: EfficientFormerArch) -> float:
        """Predicted latency (ms) of ``arch``'s deploy form: ``overhead + scale * sum(op latencies)``."""
        return self.overhead_ms + self.scale * self.op_sum(arch)

    @property
    def scale(self) -> float:
        return float(self.calibration.get("scale", 1.0)) if self.calibration else 1.0

    # -- files ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": TABLE_FORMAT,
            "version": TABLE_VERSION,
            "created": self.created,
            "complete": self.complete,
            "machine": self.machine,
            "settings": self.settings.to_dict(),
            "num_classes": self.num_classes,
            "space": self.space.to_dict(),
            "key_format": "kind/width@resolution (down/in-out@output resolution; stem@input size); ms = median",
            "overhead_ms": self.overhead_ms,
            "calibration": self.calibration,
            "entries": self.entries,
        }

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"latency table not found: {path}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TableError(f"{path} is not a latency table ({e})") from None
        if not isinstance(d, dict) or d.get("format") != TABLE_FORMAT:
            raise TableError(f"{path} is not a latency table (no format={TABLE_FORMAT!r})")
        if not isinstance(d.get("version"), int) or d["version"] > TABLE_VERSION:
            raise TableError(f"{path}: table version {d.get('version')!r} is newer than this effivit reads "
                             f"({TABLE_VERSION}); rebuild it")
        try:
            settings = MeasureSettings(**{k: v for k, v in d["settings"].items()})
            space = SearchSpace.from_dict(d["space"])
            return cls(space, settings, int(d["num_classes"]), d["entries"], d["overhead_ms"], d["machine"],
                       d["created"], d.get("calibration"))
        except (KeyError, TypeError, ValueError) as e:
            raise TableError(f"{path}: malformed latency table ({type(e).__name__}: {e})") from None

    def mismatch(self, space: SearchSpace, settings: MeasureSettings, num_classes: int) -> str:
        """'' when this table serves (space, settings, classes), else what differs."""
        mine, theirs = self.settings.to_dict(), settings.to_dict()
        for k in ("runtime", "precision", "threads", "batch_size", "clock"):
            if mine[k] != theirs[k]:
                return f"{k} is {mine[k]!r} in the table, {theirs[k]!r} asked for"
        if self.num_classes != num_classes:
            return f"the table's head has {self.num_classes} classes, the data {num_classes}"
        if space.img_size != self.space.img_size or space.hparams() != self.space.hparams():
            return "the space's image size or block hyper-parameters differ"
        for i in range(NUM_STAGES):
            if not set(space.widths(i)) <= set(self.space.widths(i)):
                return f"stage {i}'s widths {space.widths(i)} are not all in the table"
            if space.max_depths[i] > 0 and i in space.mb3d_stages and i not in self.space.mb3d_stages:
                return f"stage {i} has no MB3D entries in the table"
        return ""


def build_table(space: SearchSpace, settings: MeasureSettings, num_classes: int,
                path: str | os.PathLike | None = None, resume: bool = True,
                progress: Callable[[int, int], None] | None = None,
                keys: Iterable[str] | None = None) -> LatencyTable:
    """Measure every op of ``space`` (or just ``keys``) and save the table to ``path`` after every group.

    With ``resume`` an existing partial table at ``path`` for the same space and settings is continued.
    ``progress(done, total)`` is called after every group.
    """
    table = None
    if resume and path is not None and Path(path).is_file():
        old = LatencyTable.load(path)
        if not old.mismatch(space, settings, num_classes) and old.space == space:
            table = old
    if table is None:
        table = LatencyTable(space, settings, num_classes)
    todo = [k for k in (keys if keys is not None else space_keys(space)) if k not in table.entries]
    total = len(todo) + (table.overhead_ms is None) + (CALIBRATION_NETWORKS if not table.calibration else 0)
    channels_last = settings.runtime == "eager"
    done = 0
    if table.overhead_ms is None:
        t = measure_modules({"null": (NullOp(), null_example(settings.batch_size))}, settings)["null"]
        table.overhead_ms = t.median_ms
        done += 1
    torch.manual_seed(0)
    for start in range(0, len(todo), GROUP):
        group = todo[start:start + GROUP]
        ops = {k: build_op(k, space, num_classes, settings.batch_size, channels_last) for k in group}
        for k, t in measure_modules(ops, settings).items():
            table.entries[k] = {"ms": t.median_ms, "spread_pct": t.spread_pct}
        done += len(group)
        if path is not None:
            table.save(path)
        if progress is not None:
            progress(done, total)
    if not table.calibration and all(k in table.entries for k in space_keys(space)):
        table.calibration = calibrate(table)
        if progress is not None:
            progress(total, total)
    if path is not None:
        table.save(path)
    return table


CALIBRATION_NETWORKS = 4
CALIBRATION_SEED = 20220602  # EfficientFormer's arXiv date; the predictor study draws from other seeds


def network_op(arch: EfficientFormerArch, num_classes: int, batch_size: int) -> tuple[nn.Module, torch.Tensor]:
    """A whole ``efficientformer_custom`` network in its deploy form and an input batch."""
    from ..models.efficientformer_custom import EfficientFormerCustom

    model = fuse(EfficientFormerCustom(arch, num_classes=num_classes).eval())
    return model, torch.randn(batch_size, 3, arch.img_size, arch.img_size)


def measure_networks(archs: dict[str, EfficientFormerArch], settings: MeasureSettings,
                     num_classes: int) -> dict[str, Timing]:
    """Measured latency of whole networks (deploy form), timed together in paired rounds."""
    torch.manual_seed(0)
    return measure_modules({k: network_op(a, num_classes, settings.batch_size) for k, a in archs.items()}, settings)


def calibrate(table: LatencyTable, n: int = CALIBRATION_NETWORKS, seed: int = CALIBRATION_SEED) -> dict[str, Any]:
    """Measure ``n`` random networks of the space whole and fit the one factor between a network's latency
    and the sum of its ops' (``scale``, the median ratio).

    Why: a module timed alone, call after call, keeps its code paths and data hot; inside a network the
    same module follows others. For ONNX Runtime the factor is close to 1; for PyTorch eager, whose per-op
    dispatch dominates small blocks, it was about 1.6 on this project's CPU (docs/search.md).
    """
    import random

    from .space import random_subnet

    rng = random.Random(seed)
    archs = {f"cal{i}": table.space.arch_of(random_subnet(table.space, rng)) for i in range(n)}
    timings = measure_networks(archs, table.settings, table.num_classes)
    nets, ratios = [], []
    for k, arch in archs.items():
        ops = table.op_sum(arch)
        measured = timings[k].median_ms
        ratios.append((measured - table.overhead_ms) / ops)
        nets.append({"arch": arch.describe(), "op_sum_ms": ops, "measured_ms": measured})
    ratios.sort()
    mid = len(ratios) // 2
    scale = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
    return {"scale": scale, "seed": seed, "networks": nets}


def smallest_latency(table: LatencyTable, mb3d_stages: Iterable[int] | None = None) -> tuple[float, EfficientFormerArch]:
    """The fastest network slimming can reach: per stage one block at the smallest width, an MB4D or,
    in ``mb3d_stages`` (default: the space's; slimming passes the stages its start has MB3D blocks in,
    since it never adds one), an MB3D where that is faster."""
    space = table.space
    stages_3d = set(space.mb3d_stages if mb3d_stages is None else mb3d_stages)
    best: tuple[float, EfficientFormerArch] | None = None
    options = [("4d", "3d") if i in stages_3d else ("4d",) for i in range(NUM_STAGES)]
    for kinds in itertools.product(*options):
        stages = tuple(StageArch(space.min_width, (k,)) for k in kinds)
        arch = EfficientFormerArch(stages=stages, img_size=space.img_size, **space.hparams())
        ms = table.predict(arch)
        if best is None or ms < best[0]:
            best = (ms, arch)
    assert best is not None
    return best
