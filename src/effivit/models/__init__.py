"""One file per family; importing this package registers every variant.

Every public module of this package is a family file and is imported here, so adding a family is adding
its file (modules whose names start with ``_`` are shared helpers, imported by the families that use them).
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
