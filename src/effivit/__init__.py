"""effivit: efficient vision transformers built for deployment.

The public surface: ``create_model``, ``list_models``, ``load_checkpoint`` and ``deploy``.
"""

from . import deploy
from .checkpoint import load_checkpoint
from .factory import create_model
from .registry import list_models

__all__ = ["create_model", "deploy", "list_models", "load_checkpoint"]
__version__ = "0.1.0"
