"""The supernet of EfficientFormer's search (arXiv:2206.01191, section 4.2), trained once.

Every block position of the space is a :class:`MetaPath`: in stages without MB3D it holds an MB4D block
or nothing (identity), elsewhere an MB4D, an MB3D or nothing, each choice weighted by an architecture
parameter ``alpha``. The blocks are EfficientFormer's own (``make_block`` of
:mod:`effivit.models.efficientformer_custom`), so any path's weights are those of an
``efficientformer_custom`` network (:func:`extract_subnet`).

Training (:func:`train_supernet`) samples one path per step with Gumbel-Softmax over each MetaPath's
``alpha`` (temperature annealed from ``tau_max`` to ``tau_min``) and runs only the sampled choice, with the
straight-through gate ``1 - p.detach() + p`` (value 1) on its output, so ``alpha`` learns from the same loss
as the weights (GDAS, arXiv:1910.04465). Weights and ``alpha`` are trained jointly on the training images
(single level; ``alpha`` is frozen for the first ``arch_warmup`` of the epochs while the blocks learn).

How this differs from the paper: the stage widths are *also* sampled (multiples of the space's width step,
the full width with probability ``full_width_prob``), slimmable-network style (arXiv:1812.08928): a
narrower path uses the first channels of every layer. This is what makes the third slimming action
(narrowing a stage by 16 channels) measurable on the supernet; the paper does not say how it evaluates
narrower stages. Narrowing is done with masks on the full-width tensors (hooks on the MLPs' second layer,
LayerNorms that normalise the active channels only), exactly equal to the sliced network
(``tests/test_search.py`` checks it).

The loop reuses :mod:`effivit.train` (image folders, the model's transforms, the global-batch sampler,
AdamW groups without decay on norms and tables, warm-up + cosine, atomic checkpoints with RNG states,
torchrun/DDP); a run resumes after its last completed epoch.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.efficientformer_custom import (
    NUM_STAGES,
    EfficientFormerCustom,
    make_block,
    make_downsample,
    make_stem,
)
from .space import SearchSpace, Subnet

CHECKPOINT_FORMAT = "effivit-supernet"
CHECKPOINT_VERSION = 1


# ---- modules --------------------------------------------------------------------------------------------
class MaskedLayerNorm(nn.LayerNorm):
    """LayerNorm over the first ``active`` channels (the others come out zero): on a masked input it equals
    the LayerNorm of a network that is ``active`` channels wide. Parameter names are LayerNorm's."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__(dim, eps=eps)
        self.active = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, a = self.normalized_shape[0], self.active
        if a >= n:
            return super().forward(x)
        y = F.layer_norm(x[..., :a], (a,), self.weight[:a], self.bias[:a], self.eps)
        return F.pad(y, (0, n - a))


class MetaPath(nn.Module):
    """One block position: an MB4D block, an MB3D block where the stage allows one, or identity."""

    def __init__(self, dim: int, resolution: int, kinds: Sequence[str], arch) -> None:
        super().__init__()
        self.kinds = tuple(kinds)
        self.b4d = make_block("4d", dim, resolution, arch)
        if "3d" in self.kinds:
            b3d = make_block("3d", dim, resolution, arch)
            b3d.norm1, b3d.norm2 = MaskedLayerNorm(dim), MaskedLayerNorm(dim)
            self.b3d = b3d
        # One logit per choice, in the order of ``kinds``; zeros: every choice equally likely at first.
        self.alpha = nn.Parameter(torch.zeros(len(self.kinds)))

    def forward(self, x: torch.Tensor, choice: str) -> torch.Tensor:
        if choice == "4d":
            return self.b4d(x)
        if choice == "3d":
            return self.b3d(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # maps -> tokens -> maps
        return x

    def probabilities(self) -> dict[str, float]:
        p = torch.softmax(self.alpha.detach().float(), 0)
        return {k: float(v) for k, v in zip(self.kinds, p)}


class SuperStage(nn.Module):
    def __init__(self, downsample: nn.Module, paths: list[MetaPath]) -> None:
        super().__init__()
        self.downsample = downsample
        self.paths = nn.ModuleList(paths)


def _channel_mask(n: int, active: int, like: torch.Tensor, dim: int) -> torch.Tensor:
    shape = [1] * like.dim()
    shape[dim] = n
    return (torch.arange(n, device=like.device) < active).to(like.dtype).reshape(shape)


class Supernet(nn.Module):
    """All MetaPaths of ``space`` at its largest widths; runs the path set by :meth:`set_subnet`.

    ``forward`` returns the mean of the two heads (the custom model's eval output). With gates set
    (training), each MetaPath's output is multiplied by its straight-through gate.
    """

    def __init__(self, space: SearchSpace, num_classes: int, in_chans: int = 3) -> None:
        super().__init__()
        self.space = space
        arch = space.arch_of(space.largest())
        self.mlp_ratio = arch.mlp_ratio
        w = space.max_widths
        self.stem = make_stem(in_chans, w[0])
        stages = []
        prev = w[0]
        for i in range(NUM_STAGES):
            down: nn.Module = make_downsample(prev, w[i]) if i > 0 else nn.Identity()
            paths = [MetaPath(w[i], space.resolution(i), space.kinds(i), arch) for _ in range(space.max_depths[i])]
            stages.append(SuperStage(down, paths))
            prev = w[i]
        self.stages = nn.ModuleList(stages)
        self.norm4d = nn.BatchNorm2d(prev)
        self.norm3d = MaskedLayerNorm(prev) if "3d" in space.kinds(NUM_STAGES - 1) else nn.Identity()
        self.head = nn.Linear(prev, num_classes)
        self.head_dist = nn.Linear(prev, num_classes)
        for m in self.modules():  # EfficientFormer's initialisation
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.num_classes = num_classes
        self.subnet = space.largest()
        self.active = list(w)
        self.noise: list[list[torch.Tensor]] | None = None
        self.tau = 1.0
        self._hook_hidden_masks()

    # -- widths ---------------------------------------------------------------------------------------
    def _hook_hidden_masks(self) -> None:
        """Zero the hidden channels a narrower network does not have, where they enter the next layer."""

        def hook(stage: int, ratio: float | None, dim: int):
            def pre(_module: nn.Module, args: tuple[torch.Tensor, ...]):
                x = args[0]
                n = x.shape[dim]
                active = self.active[stage]
                hidden = active // 2 if ratio is None else int(active * ratio)
                if hidden >= n:
                    return None
                return (x * _channel_mask(n, hidden, x, dim % x.dim()),)

            return pre

        self.stem.conv2.register_forward_pre_hook(hook(0, None, 1))  # the stem's hidden width is half
        for i, stage in enumerate(self.stages):
            for mp in stage.paths:
                mp.b4d.mlp.fc2.register_forward_pre_hook(hook(i, self.mlp_ratio, 1))
                if hasattr(mp, "b3d"):
                    mp.b3d.mlp.fc2.register_forward_pre_hook(hook(i, self.mlp_ratio, -1))

    def _mask(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        n = x.shape[1]
        a = self.active[stage]
        return x if a >= n else x * _channel_mask(n, a, x, 1)

    def set_subnet(self, subnet: Subnet, noise: list[list[torch.Tensor]] | None = None, tau: float = 1.0) -> None:
        """Run ``subnet`` from now on; with ``noise`` (training) each MetaPath's output gets the
        straight-through Gumbel-Softmax gate of its choice, computed from ``alpha`` inside ``forward``."""
        self.subnet, self.noise, self.tau = subnet, noise, tau
        self.active = list(subnet.widths)
        for i, stage in enumerate(self.stages):
            for m in stage.modules():
                if isinstance(m, MaskedLayerNorm):
                    m.active = self.active[i]
        if isinstance(self.norm3d, MaskedLayerNorm):
            self.norm3d.active = self.active[-1]

    # -- sampling -------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, gen: torch.Generator, tau: float, full_width_prob: float = 0.25,
               sample_widths: bool = True) -> tuple[Subnet, list[list[torch.Tensor]]]:
        """Draw a path: per MetaPath, Gumbel noise ``g`` and the choice ``argmax(alpha + g)``; per stage, a
        width (all stages at full width with probability ``full_width_prob``). All randomness comes from
        ``gen``, so processes seeded alike draw the same path."""
        noise, choices = [], []
        for stage in self.stages:
            stage_noise, stage_choices = [], []
            for mp in stage.paths:
                u = torch.rand(len(mp.kinds), generator=gen).clamp_(1e-10, 1 - 1e-10)
                g = -torch.log(-torch.log(u))
                k = int(torch.argmax(mp.alpha.detach().float().cpu() + g))
                stage_noise.append(g)
                stage_choices.append(mp.kinds[k])
            noise.append(stage_noise)
            choices.append(tuple(stage_choices))
        full = not sample_widths or float(torch.rand(1, generator=gen)) < full_width_prob
        widths = []
        for i in range(NUM_STAGES):
            options = self.space.widths(i)
            widths.append(options[-1] if full else options[int(torch.randint(len(options), (1,), generator=gen))])
        return Subnet(tuple(widths), tuple(choices)), noise

    def _gate(self, mp: MetaPath, noise: torch.Tensor, choice: str) -> torch.Tensor:
        p = torch.softmax((mp.alpha + noise.to(mp.alpha.device, mp.alpha.dtype)) / self.tau, 0)
        k = mp.kinds.index(choice)
        return 1.0 - p[k].detach() + p[k]  # value 1, gradient of p[k]

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._mask(self.stem(x), 0)
        for i, stage in enumerate(self.stages):
            if i > 0:
                x = self._mask(stage.downsample(x), i)
            for j, mp in enumerate(stage.paths):
                choice = self.subnet.choices[i][j]
                y = mp(x, choice)
                if choice != "id":
                    y = self._mask(y, i)
                if self.noise is not None:
                    y = y * self._gate(mp, self.noise[i][j], choice)
                x = y
        kept = [c for c in self.subnet.choices[-1] if c != "id"]
        if kept and kept[-1] == "3d":
            pooled = self.norm3d(x.permute(0, 2, 3, 1)).mean((1, 2))
        else:
            pooled = self._mask(self.norm4d(x), NUM_STAGES - 1).mean((2, 3))
        return (self.head(pooled) + self.head_dist(pooled)) / 2

    # -- importance -----------------------------------------------------------------------------------
    def probabilities(self) -> list[list[dict[str, float]]]:
        """softmax(alpha) of every MetaPath, per stage."""
        return [[mp.probabilities() for mp in stage.paths] for stage in self.stages]

    def arch_parameters(self) -> list[nn.Parameter]:
        return [mp.alpha for stage in self.stages for mp in stage.paths]

    def weight_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if not n.endswith(".alpha")]


# ---- the searched network's weights ---------------------------------------------------------------------
def subnet_state_dict(supernet: Supernet, subnet: Subnet, model: EfficientFormerCustom) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` (built from ``subnet``'s architecture) taken from the supernet: the
    MetaPath each block came from, every tensor cut to the first channels along each dimension."""
    src = supernet.state_dict()
    mapping: dict[str, str] = {}
    for name, _ in model.named_children():
        if name not in ("stages", "norm"):
            mapping[name] = name
    mapping["norm"] = "norm3d" if model.tokens_out else "norm4d"
    for i, stage in enumerate(model.stages):
        mapping[f"stages.{i}.downsample"] = f"stages.{i}.downsample"
        kept = iter(subnet.kept(i))
        for j, block in enumerate(stage.blocks):
            if any(True for _ in block.parameters()):
                k = next(kept)
                kind = subnet.choices[i][k]
                mapping[f"stages.{i}.blocks.{j}"] = f"stages.{i}.paths.{k}.b{kind}"
    out = {}
    for key, target in model.state_dict().items():
        prefix = max((p for p in mapping if key == p or key.startswith(p + ".")), key=len, default=None)
        if prefix is None:
            raise KeyError(f"{key}: no supernet module maps to it")
        source = src[mapping[prefix] + key[len(prefix):]]
        if source.dim() != target.dim() or any(s < t for s, t in zip(source.shape, target.shape)):
            raise ValueError(f"{key}: supernet tensor {tuple(source.shape)} cannot give {tuple(target.shape)}")
        out[key] = source[tuple(slice(0, t) for t in target.shape)].clone() if source.dim() else source.clone()
    return out


def extract_subnet(supernet: Supernet, subnet: Subnet, meta: dict[str, Any] | None = None) -> EfficientFormerCustom:
    """An ``efficientformer_custom`` network for ``subnet`` holding the supernet's weights (on its device)."""
    arch = supernet.space.arch_of(subnet, meta)
    device = next(supernet.parameters()).device
    model = EfficientFormerCustom(arch, num_classes=supernet.num_classes)
    model.load_state_dict(subnet_state_dict(supernet, subnet, model))
    return model.to(device)


# ---- training ---------------------------------------------------------------------------------------------
@dataclass
class SupernetConfig:
    """The supernet's training recipe (the ``effivit search`` flags fill one)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    smoothing: float = 0.1
    alpha_lr: float = 3e-3
    alpha_weight_decay: float = 1e-3
    tau_max: float = 5.0
    tau_min: float = 0.5
    arch_warmup: float = 0.2  # fraction of the epochs with alpha frozen
    full_width_prob: float = 0.25
    sample_widths: bool = True
    crop_pct: float = 0.95
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    randaugment: tuple[int, int] | None = (2, 9)
    amp: str = "none"
    workers: int = 2
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.epochs >= 1, f"supernet epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.lr > 0 and self.alpha_lr > 0, f"lr and alpha_lr must be > 0, got {self.lr}, {self.alpha_lr}")
        need(0 < self.tau_min <= self.tau_max, f"need 0 < tau_min <= tau_max, got {self.tau_min}, {self.tau_max}")
        need(0 <= self.arch_warmup < 1, f"arch_warmup is a fraction in [0, 1), got {self.arch_warmup}")
        need(0 <= self.full_width_prob <= 1, f"full_width_prob is a probability, got {self.full_width_prob}")

    def recipe(self) -> dict[str, Any]:
        """What decides the trained weights (a resumed run must agree on it)."""
        d = asdict(self)
        for k in ("workers", "device", "progress"):
            d.pop(k)
        d["scale"] = list(self.scale)
        d["randaugment"] = list(self.randaugment) if self.randaugment else None
        return d


def temperature(progress: float, tau_max: float, tau_min: float) -> float:
    """Exponential annealing from ``tau_max`` (progress 0) to ``tau_min`` (progress 1)."""
    progress = min(1.0, max(0.0, progress))
    return tau_max * (tau_min / tau_max) ** progress


def holdout_split(targets: Sequence[int], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Stratified (train, held-out) indices: per class, ``round(fraction * n)`` samples (at least one when
    the class has two or more) held out, chosen by a seeded permutation."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout must be a fraction in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    train, held = [], []
    for c in sorted(by_class):
        idx = by_class[c]
        perm = [idx[k] for k in torch.randperm(len(idx), generator=g).tolist()]
        n = min(len(idx) - 1, max(1 if len(idx) > 1 else 0, int(round(fraction * len(idx)))))
        held += perm[:n]
        train += perm[n:]
    return sorted(train), sorted(held)


@dataclass
class SearchData:
    """The training images split into the supernet's part and the held-out part slimming evaluates on."""

    root: str
    classes: list[str]
    train_idx: list[int]
    holdout_idx: list[int]
    data_cfg: dict[str, Any] = field(default_factory=dict)


def search_data(data: str, space: SearchSpace, holdout: float, crop_pct: float, seed: int = 0) -> SearchData:
    from ..registry import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from ..train.data import ImageFolderDataset, find_split, resolve_data_config

    ds = ImageFolderDataset(find_split(data, "train"))
    train_idx, held = holdout_split(ds.targets, holdout, seed)
    if not held:
        raise ValueError(f"{data}/train has too few images per class to hold any out for slimming "
                         f"(need 2 or more per class)")
    cfg = {"architecture": "efficientformer_custom", "input_size": (3, space.img_size, space.img_size),
           "size_divisor": 32, "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
           "interpolation": "bicubic", "crop_pct": crop_pct}
    return SearchData(data, list(ds.classes), train_idx, held, resolve_data_config(cfg, space.img_size, crop_pct))


def train_supernet(space: SearchSpace, data: SearchData, cfg: SupernetConfig, out: str | Path,
                   log=print) -> Supernet:
    """Train the supernet (or resume ``out/last.pt``); returns it (on the training device, eval mode).

    ``torchrun --nproc_per_node=N`` runs it on N processes (DDP; every process draws the same path).
    """
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    from ..train import checkpointing
    from ..train.data import (
        GlobalBatchSampler,
        ImageFolderDataset,
        collate_skipping,
        find_split,
        train_transform,
        warn_skipped,
    )
    from ..train.distributed import all_reduce_sum, barrier, gather_objects, init_distributed
    from ..train.evaluate import autocast_context
    from ..train.loop import param_groups, warmup_cosine
    from ..train.losses import ClassificationLoss

    cfg.validate()
    out = Path(out)
    info = init_distributed(cfg.device)
    device = info.device
    autocast_context(device, cfg.amp)
    checkpointing.seed_all(cfg.seed)
    net = Supernet(space, len(data.classes)).to(device)
    transform = train_transform(data.data_cfg, cfg.scale, cfg.hflip, cfg.randaugment)
    train_ds = Subset(ImageFolderDataset(find_split(data.root, "train"), transform, data.classes), data.train_idx)
    sampler = GlobalBatchSampler(len(train_ds), cfg.batch_size, info.world_size, info.rank, 1, cfg.seed)
    # AdamW without decay on norms, biases, layer scales and bias tables (by name), as effivit train.
    groups = param_groups(_Named(dict(net.weight_parameters())), cfg.weight_decay)
    opt_w = torch.optim.AdamW(groups, lr=cfg.lr)
    opt_a = torch.optim.Adam(net.arch_parameters(), lr=cfg.alpha_lr, betas=(0.5, 0.999),
                             weight_decay=cfg.alpha_weight_decay)
    total = cfg.epochs * sampler.steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt_w, warmup_cosine(total, min(total, int(round(cfg.warmup_epochs * sampler.steps))), 0.01,
                             cfg.min_lr / cfg.lr))
    criterion = ClassificationLoss(cfg.smoothing)
    meta = {"space": space.to_dict(), "recipe": cfg.recipe(), "classes": data.classes,
            "train_idx_count": len(data.train_idx), "holdout_count": len(data.holdout_idx)}
    start_epoch, step = 0, 0
    last = out / "last.pt"
    if last.is_file():
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{last} is not a supernet checkpoint")
        saved = json.loads(ckpt["meta"])
        if saved != meta:
            diff = sorted(k for k in meta if saved.get(k) != meta[k])
            raise ValueError(f"{last} was trained with other settings ({', '.join(diff)} differ); use another "
                             f"--out, or delete {out} to train the supernet again")
        net.load_state_dict(ckpt["model"])
        opt_w.load_state_dict(ckpt["opt_w"])
        opt_a.load_state_dict(ckpt["opt_a"])
        sched.load_state_dict(ckpt["scheduler"])
        rng = ckpt.get("rng") or []
        if len(rng) == info.world_size:
            checkpointing.set_rng_state(rng[info.rank])
        start_epoch, step = int(ckpt["epoch"]) + 1, int(ckpt["step"])
        if start_epoch < cfg.epochs:
            log(f"supernet: resumed from {last} after epoch {start_epoch}")
    else:
        checkpointing.seed_all(cfg.seed + 1_000_003 * info.rank)
    ddp: nn.Module = net
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # One path per step: the blocks off the path get no gradient.
        ddp = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None,
                                      find_unused_parameters=True)
    alpha_from = int(math.ceil(cfg.arch_warmup * cfg.epochs))
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        sampler.set_epoch(epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 7919 + info.rank)
        loader = DataLoader(train_ds, batch_sampler=sampler, num_workers=cfg.workers, collate_fn=collate_skipping,
                            generator=gen, pin_memory=device.type == "cuda")
        bar = tqdm(total=sampler.steps, desc=f"supernet epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False,
                   disable=None if (info.is_main and cfg.progress) else True, file=sys.stderr, dynamic_ncols=True)
        loss_sum = count = 0.0
        t0 = time.perf_counter()
        skipped = 0
        for batch in loader:
            warn_skipped(batch.skipped, skipped)
            skipped += len(batch.skipped)
            tau = temperature(step / max(1, total - 1), cfg.tau_max, cfg.tau_min)
            # The same path on every process: a generator seeded by the step alone.
            subnet, noise = net.sample(torch.Generator().manual_seed(cfg.seed * 1_000_003 + step), tau,
                                       cfg.full_width_prob, cfg.sample_widths)
            net.set_subnet(subnet, noise, tau)
            if batch.images is not None:
                x = batch.images.to(device, non_blocking=True)
                y = batch.targets.to(device, non_blocking=True)
                with autocast_context(device, cfg.amp):
                    loss = criterion(ddp(x), y)
                loss.backward()
                loss_sum += float(loss.detach()) * y.shape[0]
                count += y.shape[0]
            opt_w.step()
            if epoch >= alpha_from:
                opt_a.step()
            opt_w.zero_grad(set_to_none=True)
            opt_a.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            bar.update(1)
            if count:
                bar.set_postfix(loss=f"{loss_sum / count:.3f}", tau=f"{tau:.2f}")
        bar.close()
        loss_sum, count = all_reduce_sum([loss_sum, count], info)
        net.set_subnet(space.largest())
        rng = gather_objects(checkpointing.rng_state(), info)
        if info.is_main:
            probs = net.probabilities()
            keep = sum(1.0 - p["id"] for stage in probs for p in stage)
            log(f"supernet epoch {epoch + 1}/{cfg.epochs}  loss {loss_sum / max(count, 1):.4f}  tau {tau:.2f}  "
                f"expected blocks {keep:.1f}  {time.perf_counter() - t0:.1f}s"
                + ("" if epoch >= alpha_from else "  (alpha frozen)"))
            checkpointing.save_atomic({
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch, "step": step,
                "meta": json.dumps(meta), "model": net.state_dict(), "opt_w": opt_w.state_dict(),
                "opt_a": opt_a.state_dict(), "scheduler": sched.state_dict(), "rng": rng,
            }, last)
            (out / "alphas.json").write_text(json.dumps(probs, indent=1) + "\n", encoding="utf-8")
        barrier(info)
    net.set_subnet(space.largest())
    return net.eval()


class _Named(nn.Module):
    """``named_parameters()`` over a subset of another module's parameters (for ``param_groups``)."""

    def __init__(self, named: dict[str, nn.Parameter]) -> None:
        super().__init__()
        self._named = named

    def named_parameters(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        return iter(self._named.items())


def load_supernet(path: str | Path, space: SearchSpace, num_classes: int) -> Supernet:
    """A trained supernet from its checkpoint (eval mode, CPU)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a supernet checkpoint (format={ckpt.get('format')!r})")
    net = Supernet(space, num_classes)
    net.load_state_dict(ckpt["model"])
    return net.eval()
