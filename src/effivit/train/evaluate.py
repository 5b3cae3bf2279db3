"""Evaluation: top-1, top-5 and loss over an image folder, at one or several input resolutions.

Sums (loss, hits, counts) are reduced over processes, so a ``torchrun`` evaluation gives exactly the
single-process numbers. Unreadable images are skipped and counted (``skipped``), never fatal.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageFolderDataset, eval_loader, eval_transform, resolve_data_config, warn_skipped
from .distributed import DistInfo, all_reduce_sum
from .losses import merged_logits
from .metrics import topk_correct


def autocast_context(device: torch.device, amp: str):
    """``torch.autocast`` for ``amp`` in ('none', 'bf16', 'fp16'); fp16 needs CUDA."""
    if amp == "none":
        return nullcontext()
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"amp {amp!r} is not supported; allowed: none, bf16, fp16")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp 'fp16' needs CUDA; on CPU use --amp bf16")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device, amp: str = "none",
             channels_last: bool = False, info: DistInfo | None = None) -> dict[str, float]:
    """``{'loss', 'top1', 'top5', 'images', 'skipped'}`` of ``model`` (put in eval mode) over ``loader``."""
    info = info or DistInfo(device=device)
    was_training = model.training
    model.eval()
    loss_sum = hit1 = hit5 = count = skipped = 0.0
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    try:
        for batch in loader:
            warn_skipped(batch.skipped, int(skipped))
            skipped += len(batch.skipped)
            if batch.images is None:
                continue
            x = batch.images.to(device, non_blocking=True).contiguous(memory_format=fmt)
            y = batch.targets.to(device, non_blocking=True)
            with autocast_context(device, amp):
                logits = merged_logits(model(x))
            logits = logits.float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            c1, c5 = topk_correct(logits, y, (1, 5))
            hit1 += c1
            hit5 += c5
            count += y.shape[0]
    finally:
        model.train(was_training)
    loss_sum, hit1, hit5, count, skipped = all_reduce_sum([loss_sum, hit1, hit5, count, skipped], info)
    if count == 0:
        raise ValueError("no readable images to evaluate")
    return {"loss": loss_sum / count, "top1": 100.0 * hit1 / count, "top5": 100.0 * hit5 / count,
            "images": int(count), "skipped": int(skipped)}


def evaluate_resolutions(model: nn.Module, folder: str | os.PathLike, img_sizes: Sequence[int],
                         classes: Sequence[str] | None = None, batch_size: int = 64, workers: int = 0,
                         crop_pct: float | None = None, device: torch.device | None = None, amp: str = "none",
                         channels_last: bool = False, info: DistInfo | None = None) -> list[dict[str, Any]]:
    """One row per resolution: the model's own preprocessing (mean/std, interpolation, crop_pct) at each size."""
    device = device or torch.device("cpu")
    info = info or DistInfo(device=device)
    rows = []
    for size in img_sizes:
        data_cfg = resolve_data_config(model.pretrained_cfg, size, crop_pct)
        ds = ImageFolderDataset(folder, eval_transform(data_cfg), classes=classes)
        loader = eval_loader(ds, batch_size, workers, info.world_size, info.rank)
        res = evaluate(model, loader, device, amp, channels_last, info)
        rows.append({"img_size": size, "crop_pct": data_cfg["crop_pct"], **res})
    return rows
