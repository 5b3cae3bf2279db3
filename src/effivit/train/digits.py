"""The embedded real data set: scikit-learn's handwritten digits written out as an image folder.

scikit-learn ships the UCI "Optical Recognition of Handwritten Digits" test set: 1,797 real 8x8 scans
(grey levels 0..16) of the digits 0-9, so demos and tests train on real images without a download.
:func:`write_digits` upscales them (bicubic) and writes ``train/<digit>/*.png`` and ``val/<digit>/*.png``
with a fixed, stratified split that does not depend on the scikit-learn or numpy version: per class, the
samples (in the order scikit-learn stores them) are shuffled by ``numpy.random.RandomState(0)``, whose
stream numpy keeps stable, and the first ``round(val_fraction * n)`` go to validation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SPLIT_SEED = 0


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the digits data set comes with scikit-learn: pip install 'effivit[train]' (or scikit-learn)"
        ) from e
    d = load_digits()
    return d.images, d.target


def split_indices(targets: Any, val_fraction: float) -> tuple[list[int], list[int]]:
    """A stratified split of sample indices, fixed by :data:`SPLIT_SEED` (train, val; each sorted)."""
    import numpy as np

    targets = np.asarray(targets)
    rng = np.random.RandomState(SPLIT_SEED)
    train, val = [], []
    for cls in sorted(set(targets.tolist())):
        idx = np.flatnonzero(targets == cls)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(val_fraction * len(idx)))
        val.extend(idx[:n_val].tolist())
        train.extend(idx[n_val:].tolist())
    return sorted(train), sorted(val)


def write_digits(
    root: str | os.PathLike,
    size: int = 32,
    val_fraction: float = 0.2,
    max_per_class: int | None = None,
) -> dict[str, Any]:
    """Write the digits as ``root/train/<d>/<index>.png`` and ``root/val/<d>/<index>.png`` (RGB, ``size`` px).

    ``max_per_class`` keeps only the first images of each class in each split (small sets for tests).
    Returns a summary (counts per split) that is also written to ``root/digits.json``.
    """
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8 (the scans are 8x8 pixels), got {size!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class!r}")
    from PIL import Image

    images, targets = _load_digits()
    train_idx, val_idx = split_indices(targets, val_fraction)
    root = Path(root)
    counts: dict[str, int] = {}
    for split, indices in (("train", train_idx), ("val", val_idx)):
        per_class: dict[int, int] = {}
        for i in indices:
            cls = int(targets[i])
            if max_per_class is not None and per_class.get(cls, 0) >= max_per_class:
                continue
            per_class[cls] = per_class.get(cls, 0) + 1
            folder = root / split / str(cls)
            folder.mkdir(parents=True, exist_ok=True)
            # Grey levels 0..16 -> 0..255; upscaled smoothly, stored as RGB like any photo folder.
            pixels = (images[i] * (255.0 / 16.0)).round().clip(0, 255).astype("uint8")
            img = Image.fromarray(pixels, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
            img.save(folder / f"{i:04d}.png")
        counts[split] = sum(per_class.values())
    summary = {
        "source": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits, 8x8 scans)",
        "classes": [str(c) for c in range(10)],
        "size": size,
        "val_fraction": val_fraction,
        "split_seed": SPLIT_SEED,
        "max_per_class": max_per_class,
        "counts": counts,
    }
    (root / "digits.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
