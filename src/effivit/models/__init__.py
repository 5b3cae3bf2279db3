"""One file per family; importing this package registers every variant."""

from . import nextvit  # noqa: F401
from . import efficientvit_mit  # noqa: F401
from . import efficientvit_msra  # noqa: F401
