"""Lazy access to :mod:`latentfit.integrations.families`.

``latentfit.models`` never imports a PPL, an array library or an engine (the layers point downwards);
the model families' PPL model functions and front doors live in the integrations layer and are loaded
only when a user asks for them.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def families() -> ModuleType:
    return importlib.import_module("latentfit.integrations.families")
