"""The training loop: AdamW + warm-up/cosine, label smoothing, drop path, clipping, AMP, EMA, DDP, distillation.

One function, :func:`train`, driven by a :class:`TrainConfig` (the ``effivit train`` command fills one from its
flags). Design points:

* ``batch_size`` is the *global* batch: per process and micro-step it is ``batch_size / (processes x
  accum_steps)``. With :class:`~effivit.train.data.GlobalBatchSampler` every optimizer step sees the same
  samples whatever the number of processes, so a 2-process run reproduces a 1-process run with 2
  accumulation steps (exactly, up to float summation order; also with BatchNorm, whose statistics are
  per micro-batch in both) and, for models without BatchNorm, a 1-process run with the whole batch at once.
* Weight decay skips 1-D parameters (norms, biases, layer scales) and position/bias tables (by name, plus
  the model's own ``no_weight_decay()`` if it has one).
* A checkpoint (``last.pt``) is written atomically after every epoch, with RNG states; ``resume`` restarts
  after the last completed epoch and, with the same seed and settings, ends with the same weights as an
  uninterrupted run (the data order and worker seeds are functions of (seed, epoch, rank)).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpointing
from .data import (
    GlobalBatchSampler,
    ImageFolderDataset,
    collate_skipping,
    eval_loader,
    eval_transform,
    find_split,
    mixup_cutmix,
    resolve_data_config,
    train_transform,
    warn_skipped,
)
from .distributed import (
    DistInfo,
    all_reduce_sum,
    all_true,
    barrier,
    cleanup,
    gather_objects,
    init_distributed,
)
from .ema import make_ema
from .evaluate import autocast_context, evaluate
from .losses import DISTILL_KINDS, ClassificationLoss, DistillationLoss, merged_logits, training_loss
from .metrics import MetricsLog, plot_curves, topk_correct

AMP_KINDS = ("none", "bf16", "fp16")
# Parameters named like these are tables (positions, attention biases, tokens): no weight decay.
NO_DECAY_NAME_PARTS = ("pos_embed", "pos_emb", "position", "attention_bias", "rel_pos", "relative_position",
                       "bias_table", "cls_token", "dist_token")


class SimulatedCrash(RuntimeError):
    """Raised by ``crash_after_steps`` (testing resume): the run stops as a kill would, mid-epoch."""


@dataclass
class TrainConfig:
    model: str
    data: str
    output: str = ""  # default: runs/<model>
    epochs: int = 10
    batch_size: int = 128  # global batch (all processes, all accumulation steps)
    accum_steps: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    warmup_start_factor: float = 0.01
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    smoothing: float = 0.1
    drop_path: float | None = None  # None: the model's default
    clip_grad: float | None = None
    amp: str = "none"
    channels_last: bool = False
    ema_decay: float = 0.0  # 0: no EMA
    # data
    img_size: int | None = None  # None: the model's input size
    crop_pct: float | None = None
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    randaugment: tuple[int, int] | None = (2, 9)
    mixup: float = 0.0
    cutmix: float = 0.0
    workers: int = 2
    # model
    pretrained: str | None = None  # any load_checkpoint source, or "official"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # distillation
    teacher: str | None = None
    teacher_checkpoint: str | None = None
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    distill: str = "soft"
    distill_tau: float = 1.0
    distill_alpha: float = 0.5
    # run
    resume: str | None = None  # a last.pt path, or "auto" (output/last.pt)
    overwrite: bool = False
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"
    progress: bool = True
    plot: bool = False
    log_interval: int = 0  # >0: global loss of every n-th step in steps.jsonl
    eval_every: int = 1
    crash_after_steps: int | None = None  # testing: stop abruptly after this many optimizer steps

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.accum_steps >= 1, f"accum_steps must be >= 1, got {self.accum_steps}")
        need(self.lr > 0 and self.min_lr >= 0, f"lr must be > 0 and min_lr >= 0, got {self.lr}, {self.min_lr}")
        need(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        need(0 < self.warmup_start_factor <= 1, f"warmup_start_factor must be in (0, 1], got {self.warmup_start_factor}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.amp in AMP_KINDS, f"amp {self.amp!r} is not supported; allowed: {AMP_KINDS}")
        need(self.clip_grad is None or self.clip_grad > 0, f"clip_grad must be > 0, got {self.clip_grad}")
        need(self.ema_decay == 0 or 0 < self.ema_decay < 1, f"ema_decay must be 0 (off) or in (0, 1), got {self.ema_decay}")
        need(self.distill in DISTILL_KINDS, f"distill {self.distill!r} is not supported; allowed: {DISTILL_KINDS}")
        need(self.teacher is None or self.teacher_checkpoint is not None,
             "a teacher needs its trained weights: pass --teacher-checkpoint")
        need(self.workers >= 0, f"workers must be >= 0, got {self.workers}")
        need(self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}")
        need(self.log_interval >= 0, f"log_interval must be >= 0, got {self.log_interval}")


# ---- building blocks -------------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed weights, and 1-D parameters / position and bias tables without decay."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name in skip or any(part in name for part in NO_DECAY_NAME_PARTS):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def warmup_cosine(total_steps: int, warmup_steps: int, start_factor: float, min_factor: float) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warm-up from ``start_factor``, then cosine to ``min_factor``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return start_factor + (1.0 - start_factor) * step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_model(name: str, num_classes: int, model_kwargs: dict[str, Any] | None = None,
                drop_path: float | None = None, pretrained: str | None = None) -> nn.Module:
    """``create_model`` with a new ``num_classes`` head; ``pretrained`` weights keep the backbone, and the
    head too when its shape fits (a checkpoint trained on the same classes)."""
    from ..checkpoint import load_checkpoint
    from ..factory import create_model

    kwargs = dict(model_kwargs or {})
    if drop_path is not None:
        kwargs["drop_path_rate"] = drop_path
    if pretrained == "official":
        return create_model(name, pretrained=True, num_classes=num_classes, **kwargs)
    model = create_model(name, num_classes=num_classes, **kwargs)
    if pretrained:
        # Another number of classes keeps the backbone and starts a new head (the dropped keys are logged).
        load_checkpoint(model, pretrained, adapt_classifier=True)
    return model


def _set_distilled_training(model: nn.Module, enable: bool) -> None:
    fn = getattr(model, "set_distilled_training", None)
    if callable(fn):
        fn(enable)


def _sync_grads(model: nn.Module, info: DistInfo) -> None:
    """Average gradients by hand (a final micro-step that every process skipped left them unsynchronised)."""
    import torch.distributed as dist

    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= info.world_size


class _Printer:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)


# ---- the loop --------------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.data`` (``train/`` and ``val/`` image folders). Returns a summary dict."""
    cfg.validate()
    info = init_distributed(cfg.device)
    try:
        return _Run(cfg, info).run()
    finally:
        cleanup(info)


class _Run:
    def __init__(self, cfg: TrainConfig, info: DistInfo) -> None:
        self.cfg, self.info = cfg, info
        self.print = _Printer(info.is_main)
        self.out = Path(cfg.output or f"runs/{cfg.model}")
        self.device = info.device

    # -- setup ----------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, info = self.cfg, self.info
        autocast_context(self.device, cfg.amp)  # fail before any work if the device cannot run this AMP kind
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        resume_path = self._resume_path()
        if info.is_main:
            for stale in checkpointing.remove_stale_temporaries(self.out):
                self.print(f"removed {stale.name}: a write interrupted by a killed run")
        if resume_path is None and (self.out / "last.pt").exists() and not cfg.overwrite:
            raise ValueError(f"{self.out} already holds a run (last.pt); pass --resume to continue it, "
                             f"--overwrite to start again, or another --output")
        checkpointing.seed_all(cfg.seed)  # the same initial weights on every process

        self.train_ds = ImageFolderDataset(find_split(cfg.data, "train"))
        self.classes = self.train_ds.classes
        n = len(self.classes)
        self.model = build_model(cfg.model, n, cfg.model_kwargs, cfg.drop_path, cfg.pretrained)
        self.data_cfg = resolve_data_config(self.model.pretrained_cfg, cfg.img_size, cfg.crop_pct)
        self.train_ds.transform = train_transform(self.data_cfg, cfg.scale, cfg.hflip, cfg.randaugment)
        self.val_ds = ImageFolderDataset(find_split(cfg.data, "val"), eval_transform(self.data_cfg), self.classes)
        self.sampler = GlobalBatchSampler(len(self.train_ds), cfg.batch_size, info.world_size, info.rank,
                                          cfg.accum_steps, cfg.seed)
        self.val_loader = eval_loader(self.val_ds, max(1, cfg.batch_size // info.world_size), cfg.workers,
                                      info.world_size, info.rank)
        self.mix = mixup_cutmix(n, cfg.mixup, cfg.cutmix)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

        self.model.to(self.device, memory_format=self.memory_format)
        _set_distilled_training(self.model, cfg.teacher is not None)
        self.ema = make_ema(self.model, cfg.ema_decay) if cfg.ema_decay else None
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp: nn.Module = DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        else:
            self.ddp = self.model
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
        self.steps_per_epoch = self.sampler.steps
        total = cfg.epochs * self.steps_per_epoch
        warmup = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(total, min(warmup, total), cfg.warmup_start_factor, cfg.min_lr / cfg.lr))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.criterion = ClassificationLoss(cfg.smoothing)
        self.teacher = None
        self.distill_loss = None
        if cfg.teacher:
            self.teacher = build_model(cfg.teacher, n, cfg.teacher_kwargs, None, None)
            from ..checkpoint import load_checkpoint

            load_checkpoint(self.teacher, cfg.teacher_checkpoint)  # strict: trained on these classes
            self.teacher.to(self.device, memory_format=self.memory_format).eval().requires_grad_(False)
            self.distill_loss = DistillationLoss(self.criterion, cfg.distill, cfg.distill_tau, cfg.distill_alpha)

        self.start_epoch, self.global_step, self.best = 0, 0, {"epoch": -1, "val_top1": -1.0}
        self.metrics = MetricsLog(self.out) if info.is_main else None
        if resume_path is not None:
            self._restore(resume_path)
        else:
            if self.metrics is not None:
                self.metrics.truncate(-1)
                (self.out / "steps.jsonl").unlink(missing_ok=True)
            # Per-process streams for augmentation and drop path (process 0 keeps the seed's stream).
            checkpointing.seed_all(cfg.seed + 1_000_003 * info.rank)
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(self._config_dict(), indent=2) + "\n", encoding="utf-8")

    def _config_dict(self) -> dict[str, Any]:
        d = checkpointing.plain_config(asdict(self.cfg))
        d.update(world_size=self.info.world_size, data_config=self.data_cfg, classes=self.classes,
                 num_params=sum(p.numel() for p in self.model.parameters()))
        return d

    def _resume_path(self) -> Path | None:
        r = self.cfg.resume
        if not r:
            return None
        if r == "auto":
            p = self.out / "last.pt"
            return p if p.exists() else None  # nothing to resume yet: start
        return Path(r)

    def _restore(self, path: Path) -> None:
        ckpt = checkpointing.load(path)
        if ckpt["model_name"] != self.cfg.model:
            raise ValueError(f"{path} is a checkpoint of {ckpt['model_name']!r}, not of --model {self.cfg.model!r}")
        if list(ckpt["classes"]) != self.classes:
            raise ValueError(f"{path} was trained on classes {ckpt['classes']}, the data has {self.classes}")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if ckpt.get("ema") is None:
                raise ValueError(f"{path} has no EMA weights; resume without --ema-decay or start a new run")
            self.ema.load_state_dict(ckpt["ema"])
        rng = ckpt.get("rng") or []
        if len(rng) == self.info.world_size:
            checkpointing.set_rng_state(rng[self.info.rank])
        else:  # another number of processes: a fresh, still seeded, stream per process
            self.print(f"note: {path} holds RNG states of {len(rng)} process(es), this run has "
                       f"{self.info.world_size}; random streams are re-seeded (results will differ)")
            checkpointing.seed_all(self.cfg.seed + 1_000_003 * self.info.rank + 7919 * (ckpt["epoch"] + 1))
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.global_step = int(ckpt["global_step"])
        self.best = dict(ckpt.get("best") or self.best)
        if self.metrics is not None:
            self.metrics.truncate(int(ckpt["epoch"]))
        self.print(f"resumed from {path} after epoch {self.start_epoch} (step {self.global_step})")

    # -- one epoch ------------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        cfg, info, A = self.cfg, self.info, self.cfg.accum_steps
        self.ddp.train()
        self.sampler.set_epoch(epoch)
        # Worker seeds come from this generator: a function of (seed, epoch, rank), so resume is exact.
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 7919 + info.rank)
        loader = DataLoader(self.train_ds, batch_sampler=self.sampler, num_workers=cfg.workers,
                            collate_fn=collate_skipping, generator=gen, pin_memory=self.device.type == "cuda")
        sums = dict(loss=0.0, base=0.0, distill=0.0, hit1=0.0, count=0.0, skipped=0.0)
        step_loss = step_count = 0.0
        # disable=None: tqdm shows the bar on a terminal only (logs of batch jobs stay readable).
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=None if (info.is_main and cfg.progress) else True, leave=False, dynamic_ncols=True,
                   mininterval=0.5, file=sys.stderr)
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(loader):
            j = i % A
            warn_skipped(batch.skipped, int(sums["skipped"]))
            sums["skipped"] += len(batch.skipped)
            if all_true(batch.images is not None, info):
                parts, out, y_hard = self._forward_backward(batch, last_micro=j == A - 1)
                n = y_hard.shape[0]
                total = parts.total.detach().item()
                sums["loss"] += total * n
                sums["base"] += parts.base.detach().item() * n
                if parts.distill is not None:
                    sums["distill"] += parts.distill.detach().item() * n
                sums["hit1"] += topk_correct(merged_logits(out).detach(), y_hard, (1,))[0]
                sums["count"] += n
                step_loss += total * n
                step_count += n
            elif j == A - 1 and info.distributed and A > 1:
                _sync_grads(self.model, info)
            if j != A - 1:
                continue
            self._optimizer_step()
            if cfg.log_interval and self.global_step % cfg.log_interval == 0:
                self._log_step(epoch, step_loss, step_count)
            step_loss = step_count = 0.0
            bar.update(1)
            if sums["count"]:
                bar.set_postfix(loss=f"{sums['loss'] / sums['count']:.4f}",
                                lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
            if cfg.crash_after_steps is not None and self.global_step >= cfg.crash_after_steps:
                bar.close()
                raise SimulatedCrash(f"simulated crash after {self.global_step} steps (testing --resume)")
        bar.close()
        elapsed = time.perf_counter() - t0
        keys = list(sums)
        totals = dict(zip(keys, all_reduce_sum([sums[k] for k in keys], info)))
        count = max(totals["count"], 1.0)
        res = {
            "train_loss": totals["loss"] / count,
            "train_top1": 100.0 * totals["hit1"] / count,
            "train_images": int(totals["count"]),
            "train_skipped": int(totals["skipped"]),
            "throughput": totals["count"] / elapsed,
            "train_time_s": elapsed,
        }
        if self.teacher is not None:
            res["train_ce"] = totals["base"] / count
            res["train_distill"] = totals["distill"] / count
        return res

    def _forward_backward(self, batch, last_micro: bool):
        x = batch.images.to(self.device, non_blocking=True)
        y = y_hard = batch.targets.to(self.device, non_blocking=True)
        if self.mix is not None:
            x, y = self.mix(x, y)
        x = x.contiguous(memory_format=self.memory_format)
        no_sync = self.info.distributed and not last_micro
        with self.ddp.no_sync() if no_sync else nullcontext():
            with autocast_context(self.device, self.cfg.amp):
                out = self.ddp(x)
                if self.teacher is not None:
                    with torch.no_grad():
                        t_logits = merged_logits(self.teacher(x))
                    parts = self.distill_loss(out, y, t_logits)
                else:
                    parts = training_loss(self.criterion, out, y)
            self.scaler.scale(parts.total / self.cfg.accum_steps).backward()
        return parts, out, y_hard

    def _optimizer_step(self) -> None:
        if self.cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.global_step += 1
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def _log_step(self, epoch: int, loss_sum: float, count: float) -> None:
        loss_sum, count = all_reduce_sum([loss_sum, count], self.info)
        if self.info.is_main and count:
            row = {"step": self.global_step, "epoch": epoch, "loss": loss_sum / count,
                   "lr": self.optimizer.param_groups[0]["lr"]}
            with (self.out / "steps.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    # -- checkpoints ----------------------------------------------------------------------------------------
    def checkpoint(self, epoch: int) -> dict[str, Any]:
        rng = gather_objects(checkpointing.rng_state(), self.info)
        return {
            "format": checkpointing.FORMAT,
            "version": checkpointing.VERSION,
            "epoch": epoch,
            "global_step": self.global_step,
            "model_name": self.cfg.model,
            "num_classes": len(self.classes),
            "classes": list(self.classes),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng,
            "best": dict(self.best),
            "data_config": dict(self.data_cfg),
            "config": checkpointing.plain_config(asdict(self.cfg)),
        }

    # -- main -----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.setup()
        cfg, info = self.cfg, self.info
        n_params = sum(p.numel() for p in self.model.parameters())
        self.print(
            f"training {cfg.model} ({n_params / 1e6:.2f}M params, {len(self.classes)} classes) on "
            f"{len(self.train_ds)} train / {len(self.val_ds)} val images at {self.data_cfg['img_size']}px; "
            f"{info.world_size} process(es) on {self.device.type}, global batch {cfg.batch_size}, "
            f"{self.steps_per_epoch} steps/epoch"
            + (f"; distilling from {cfg.teacher} ({cfg.distill}, tau={cfg.distill_tau}, alpha={cfg.distill_alpha})"
               if self.teacher is not None else "")
        )
        row: dict[str, Any] = {}
        for epoch in range(self.start_epoch, cfg.epochs):
            row = {"epoch": epoch, **self.train_epoch(epoch)}
            row["lr"] = self.optimizer.param_groups[0]["lr"]
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                val = evaluate(self.model, self.val_loader, self.device, cfg.amp, cfg.channels_last, info)
                row.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"],
                           val_skipped=val["skipped"])
                if self.ema is not None:
                    ev = evaluate(self.ema.module, self.val_loader, self.device, cfg.amp, cfg.channels_last, info)
                    row.update(ema_val_loss=ev["loss"], ema_val_top1=ev["top1"], ema_val_top5=ev["top5"])
            self.print(self._summary(row))
            improved = row.get("val_top1", -1.0) > self.best["val_top1"]
            if improved:
                self.best = {"epoch": epoch, "val_top1": row["val_top1"]}
            ckpt = self.checkpoint(epoch)  # collective (RNG gather): every process takes part
            if info.is_main:
                self.metrics.append(row)
                checkpointing.save_atomic(ckpt, self.out / "last.pt")
                if improved:
                    checkpointing.save_atomic(
                        {k: ckpt[k] for k in ("model_name", "num_classes", "classes", "model", "epoch",
                                              "data_config")} | {"val_top1": row["val_top1"]},
                        self.out / "best.pt")
                if cfg.plot:
                    plot_curves(self.metrics.rows, self.out / "curves.png", title=f"{cfg.model} on {cfg.data}")
            barrier(info)
        final = self.metrics.rows[-1] if self.metrics is not None and self.metrics.rows else row
        if info.is_main and self.metrics is not None and self.metrics.rows:
            self.print(f"done: val top-1 {final.get('val_top1', float('nan')):.2f}% (best "
                       f"{self.best['val_top1']:.2f}% at epoch {self.best['epoch'] + 1}); "
                       f"checkpoints and metrics in {self.out}")
        return {"output": str(self.out), "final": final, "best": dict(self.best),
                "global_step": self.global_step, "world_size": info.world_size}

    def _summary(self, row: dict[str, Any]) -> str:
        s = (f"epoch {row['epoch'] + 1}/{self.cfg.epochs}  train loss {row['train_loss']:.4f} "
             f"top1 {row['train_top1']:.2f}%")
        if "val_top1" in row:
            s += f"  val loss {row['val_loss']:.4f} top1 {row['val_top1']:.2f}% top5 {row['val_top5']:.2f}%"
        if "ema_val_top1" in row:
            s += f"  ema top1 {row['ema_val_top1']:.2f}%"
        if "train_distill" in row:
            s += f"  (ce {row['train_ce']:.4f}, distill {row['train_distill']:.4f})"
        s += f"  {row['throughput']:.1f} img/s  lr {row['lr']:.2e}  {row['train_time_s']:.1f}s"
        skipped = row.get("train_skipped", 0) + row.get("val_skipped", 0)
        if skipped:
            s += f"  skipped {skipped} unreadable image(s)"
        return s
