"""One file per family; importing this package registers every variant."""

from . import nextvit  # noqa: F401
