"""Codec implementations, one module per family; importing this package registers them all.

Every module in this package is imported here (pkgutil), so a new codec family needs only a new
module with ``@register_codec`` classes.
"""

import importlib
import pkgutil

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
