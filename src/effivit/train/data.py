"""Image-folder data: datasets that skip unreadable images, the model's own transforms, mixup/cutmix, samplers.

Preprocessing comes from ``model.pretrained_cfg`` (input size, mean/std, interpolation, crop_pct), as in
timm's ``resolve_data_config``. Training augmentation is torchvision.transforms.v2 (random-resized crop,
flip, RandAugment; MixUp/CutMix on the batch).

Samplers: :class:`GlobalBatchSampler` cuts one seeded permutation per epoch into *global* batches and gives
each (rank, accumulation micro-step) a fixed slice of it, so N processes with a global batch B see exactly
the samples that one process sees with B and N accumulation steps (and, without BatchNorm, with B at once).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

# PIL raises these for truncated, corrupt or absurd files (SyntaxError: some broken headers).
_IMAGE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError, EOFError)


@dataclass(frozen=True)
class SkippedImage:
    """Returned by :class:`ImageFolderDataset` in place of a sample whose file cannot be read."""

    path: str
    reason: str


def _pil_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    return _IMAGE_ERRORS + (Image.DecompressionBombError,)


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` (torchvision's ImageFolder layout) that never crashes on a bad file.

    ``classes`` fixes the class list (validation uses the training folder's classes; a class folder
    missing from ``root`` is allowed). A file that cannot be decoded yields a :class:`SkippedImage`,
    which :func:`collate_skipping` drops and counts.
    """

    def __init__(self, root: str | os.PathLike, transform: Any = None, classes: Sequence[str] | None = None):
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root} (expected {root}/<class>/<image files>)")
        if classes is None:
            classes, _ = find_classes(str(root))  # sorted sub-folder names
        self.root = root
        self.classes = list(classes)
        if not self.classes:
            raise ValueError(f"no class sub-folders in {root} (expected {root}/<class>/<image files>)")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        present = {c: i for c, i in self.class_to_idx.items() if (root / c).is_dir()}
        self.samples = make_dataset(str(root), present, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not self.samples:
            raise ValueError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {root}")
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self._errors = _pil_errors()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int] | SkippedImage:
        from PIL import Image

        path, target = self.samples[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")  # forces the decode, so truncated files fail here
        except self._errors as e:
            return SkippedImage(path, f"{type(e).__name__}: {e}")
        if self.transform is not None:
            img = self.transform(img)
        return img, target


@dataclass
class Batch:
    images: torch.Tensor | None
    targets: torch.Tensor | None
    skipped: list[SkippedImage]

    def __len__(self) -> int:
        return 0 if self.targets is None else int(self.targets.shape[0])


def collate_skipping(items: list[Any]) -> Batch:
    """Stack the readable samples; report the unreadable ones (the loop warns and counts them)."""
    good = [it for it in items if not isinstance(it, SkippedImage)]
    skipped = [it for it in items if isinstance(it, SkippedImage)]
    if not good:
        return Batch(None, None, skipped)
    images = torch.stack([g[0] for g in good])
    targets = torch.tensor([g[1] for g in good], dtype=torch.long)
    return Batch(images, targets, skipped)


def warn_skipped(skipped: Sequence[SkippedImage], already: int, limit: int = 10) -> None:
    """Warn about the first ``limit`` unreadable images of an epoch (the epoch summary gives the count)."""
    for s in skipped:
        if already < limit:
            warnings.warn(f"skipped unreadable image {s.path} ({s.reason})", RuntimeWarning, stacklevel=2)
        elif already == limit:
            warnings.warn("more unreadable images skipped; see the epoch summary for the count",
                          RuntimeWarning, stacklevel=2)
        already += 1


# ---- transforms ------------------------------------------------------------------------------------------
def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    modes = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
             "nearest": InterpolationMode.NEAREST}
    if name not in modes:
        raise ValueError(f"interpolation {name!r} is not supported; allowed: {sorted(modes)}")
    return modes[name]


def resolve_data_config(pretrained_cfg: dict[str, Any], img_size: int | None = None,
                        crop_pct: float | None = None) -> dict[str, Any]:
    """Input size, mean/std, interpolation and crop_pct for a model (overrides win), validated."""
    size = int(img_size) if img_size is not None else int(pretrained_cfg["input_size"][-1])
    divisor = int(pretrained_cfg.get("size_divisor", 1))
    native = int(pretrained_cfg["input_size"][-1])
    if size <= 0 or size % divisor != 0:
        raise ValueError(f"image size {size} is not allowed for {pretrained_cfg.get('architecture')}: "
                         f"it must be a positive multiple of {divisor}")
    if pretrained_cfg.get("fixed_input_size") and size != native:
        raise ValueError(f"{pretrained_cfg.get('architecture')} only runs at {native}x{native}; got {size}")
    pct = float(crop_pct) if crop_pct is not None else float(pretrained_cfg.get("crop_pct", 0.875))
    if not 0.0 < pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {pct}")
    return {
        "img_size": size,
        "mean": tuple(pretrained_cfg["mean"]),
        "std": tuple(pretrained_cfg["std"]),
        "interpolation": pretrained_cfg.get("interpolation", "bicubic"),
        "crop_pct": pct,
    }


def eval_transform(data_cfg: dict[str, Any]):
    """Resize the short side to ``img_size / crop_pct``, centre-crop ``img_size``, normalise."""
    from torchvision.transforms import v2

    size = data_cfg["img_size"]
    return v2.Compose([
        v2.Resize(int(math.floor(size / data_cfg["crop_pct"])), interpolation=_interpolation(data_cfg["interpolation"]),
                  antialias=True),
        v2.CenterCrop(size),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=data_cfg["mean"], std=data_cfg["std"]),
    ])


def train_transform(data_cfg: dict[str, Any], scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5,
                    randaugment: tuple[int, int] | None = (2, 9)):
    """Random-resized crop, horizontal flip (probability ``hflip``), RandAugment ``(num_ops, magnitude)``."""
    from torchvision.transforms import v2

    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
    if not 0.0 <= hflip <= 1.0:
        raise ValueError(f"hflip is a probability in [0, 1], got {hflip}")
    ops: list[Any] = [
        v2.RandomResizedCrop(data_cfg["img_size"], scale=tuple(scale),
                             interpolation=_interpolation(data_cfg["interpolation"]), antialias=True),
    ]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if randaugment is not None:
        num_ops, magnitude = randaugment
        if num_ops < 0 or not 0 <= magnitude <= 30:
            raise ValueError(f"randaugment takes (num_ops >= 0, magnitude in 0..30), got {tuple(randaugment)}")
        if num_ops > 0:
            ops.append(v2.RandAugment(num_ops=num_ops, magnitude=magnitude))
    ops += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=data_cfg["mean"], std=data_cfg["std"])]
    return v2.Compose(ops)


def mixup_cutmix(num_classes: int, mixup: float = 0.0, cutmix: float = 0.0):
    """A batch transform ``(images, targets) -> (images, soft targets)``, or None when both are off."""
    if mixup < 0 or cutmix < 0:
        raise ValueError(f"mixup and cutmix alphas must be >= 0 (0 = off), got {mixup}, {cutmix}")
    if mixup == 0 and cutmix == 0:
        return None
    from torchvision.transforms import v2

    choices = []
    if mixup > 0:
        choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    return choices[0] if len(choices) == 1 else v2.RandomChoice(choices)


def find_split(data: str | os.PathLike, split: str) -> Path:
    """``data/<split>`` (``val`` also accepts ``validation``); a clear error naming the expected layout."""
    root = Path(data)
    names = ["val", "validation"] if split == "val" else [split]
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise FileNotFoundError(
        f"{root} has no {' or '.join(names)} folder; expected {root}/train/<class>/<images> and "
        f"{root}/val/<class>/<images> (write a demo set with `effivit data digits {root}`)"
    )


# ---- samplers --------------------------------------------------------------------------------------------
class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this process's micro-batches: ``steps`` global batches x ``accum_steps`` micro-batches each.

    Every epoch draws one permutation from ``seed + epoch``; global batch k is ``perm[k*B:(k+1)*B]``
    (the incomplete tail is dropped), cut into ``world_size * accum_steps`` equal slices; slice
    ``rank * accum_steps + j`` is micro-step j of ``rank``.
    """

    def __init__(self, num_samples: int, global_batch: int, world_size: int = 1, rank: int = 0,
                 accum_steps: int = 1, seed: int = 0, shuffle: bool = True) -> None:
        parts = world_size * accum_steps
        if global_batch < 1 or global_batch % parts != 0:
            raise ValueError(f"batch size {global_batch} must be a positive multiple of processes x "
                             f"accumulation steps = {world_size} x {accum_steps}")
        if num_samples < global_batch:
            raise ValueError(f"batch size {global_batch} is larger than the data set ({num_samples} images); "
                             f"use a smaller --batch-size")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.world_size, self.rank, self.accum_steps = world_size, rank, accum_steps
        self.micro = global_batch // parts
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    @property
    def steps(self) -> int:
        return self.num_samples // self.global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * self.accum_steps

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            perm = list(range(self.num_samples))
        for k in range(self.steps):
            batch = perm[k * self.global_batch:(k + 1) * self.global_batch]
            for j in range(self.accum_steps):
                c = self.rank * self.accum_steps + j
                yield batch[c * self.micro:(c + 1) * self.micro]


class ShardSampler(Sampler[int]):
    """Evaluation: rank r takes samples r, r+N, r+2N, ... (no padding, so summed counts are exact)."""

    def __init__(self, num_samples: int, world_size: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, num_samples, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def eval_loader(dataset: Dataset, batch_size: int, workers: int = 0, world_size: int = 1, rank: int = 0):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), world_size, rank),
                      num_workers=workers, collate_fn=collate_skipping, persistent_workers=False)
