"""Training and evaluation: image-folder data, AdamW + cosine loop with EMA/AMP/DDP, DeiT-style distillation.

The pieces are usable on their own (``data``, ``losses``, ``ema``, ``checkpointing``, ``distributed``,
``evaluate``, ``metrics``) and are put together by :func:`effivit.train.loop.train` and the ``effivit
train / eval / data`` commands. torchvision, scikit-learn and matplotlib are imported lazily (the
``effivit[train]`` extra) so the core package stays lean.
"""

from __future__ import annotations

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str):
    # Lazy: importing effivit.train must not pull in torchvision.
    if name in ("TrainConfig", "train"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'effivit.train' has no attribute {name!r}")
