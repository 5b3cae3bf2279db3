"""One file per family; importing this package registers every variant."""

from . import nextvit  # noqa: F401
from . import fastvit  # noqa: F401
from . import efficientvit_mit  # noqa: F401
from . import efficientvit_msra  # noqa: F401
from . import levit  # noqa: F401
from . import efficientformer  # noqa: F401
from . import efficientformer_v2  # noqa: F401
from . import convnext  # noqa: F401
from . import repvit  # noqa: F401
