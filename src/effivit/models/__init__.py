"""One file per family; importing this package registers every variant."""

from . import (  # noqa: F401
    convnext,
    efficientformer,
    efficientformer_v2,
    efficientvit_mit,
    efficientvit_msra,
    fastvit,
    levit,
    nextvit,
    repvit,
)
