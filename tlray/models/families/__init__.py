"""One module per architecture family, named after the family in the arch table (tlray.archs).

Each module holds everything tlray knows about its family's torchvision models, in one function:
`anatomy(model) -> tlray.models.anatomy.Anatomy` (its blocks, neck, head side and head). A new family
is its module here plus its rows in archs.ARCHS: the map below is derived from the table, and a
family's module is imported when one of its models is first looked at.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from tlray import archs

FAMILY_MODULES: dict[str, str] = {family: f"{__name__}.{family}" for family in archs.SUPPORTED_FAMILIES}


def family_module(family: str) -> ModuleType:
    """The module that describes `family`'s models (see the module docstring)."""
    return importlib.import_module(FAMILY_MODULES[family])
