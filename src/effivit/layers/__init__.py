"""Shared building blocks: one idea per module, used by every family that needs it."""

from .classifier import ClassifierHead, NormMlpClassifierHead
from .conv_bn import ConvNorm
from .drop import DropPath, drop_path
from .helpers import make_divisible
from .mlp import ConvMlp, Mlp
from .norm import GlobalResponseNorm, LayerNorm2d
from .scale import LayerScale, LayerScale2d
from .se import SqueezeExcite

__all__ = [
    "ClassifierHead",
    "ConvMlp",
    "ConvNorm",
    "DropPath",
    "GlobalResponseNorm",
    "LayerNorm2d",
    "LayerScale",
    "LayerScale2d",
    "Mlp",
    "NormMlpClassifierHead",
    "SqueezeExcite",
    "drop_path",
    "make_divisible",
]
