"""A layer's face: the names other layers, jobs and users take from it, loaded on first use.

Each subpackage's ``__init__`` declares its public names and the module that
owns each one; importing the subpackage stays cheap (no torch or pyarrow)
until a name is used. The layer rule (``tests/test_layout.py``) reads these
module paths like any other import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_face(package: str, owners: Mapping[str, str]
              ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for a package whose names live in the modules ``owners`` gives.

    Args:
        package: the package's ``__name__`` (for the error message).
        owners: public name -> the full module path that defines it.

    Returns:
        The module-level ``__getattr__`` and ``__dir__`` of the face.
    """

    def __getattr__(name: str) -> Any:
        try:
            module = owners[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        return getattr(importlib.import_module(module), name)

    def __dir__() -> list[str]:
        return sorted(owners)

    return __getattr__, __dir__
