"""Names of a package loaded on first use (PEP 562): the package lists them in `__all__` (and imports them under
`TYPE_CHECKING` for type checkers); `lazy_names` gives it the `__getattr__` and `__dir__` that import them."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_names(
    package: str, sources: Sequence[str], aliases: Mapping[str, str] | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`: a name of its `__all__` is taken from the first of `sources` (module
    names, lightest first) that has it (or has its `aliases` target), then kept as a plain attribute."""
    module = sys.modules[package]
    aliases = dict(aliases or {})

    def __getattr__(name: str) -> Any:
        if name not in module.__all__:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        wanted = aliases.get(name, name)
        for source in sources:
            found = importlib.import_module(source)
            if hasattr(found, wanted):
                value = getattr(found, wanted)
                setattr(module, name, value)
                return value
        raise AttributeError(f"module {package!r}: {name!r} is in none of {list(sources)}")

    def __dir__() -> list[str]:
        return sorted({*vars(module), *module.__all__})

    return __getattr__, __dir__
