"""Optional packages (transformers, timm) in tests: a package that is missing, too old, or broken in
this environment (timm and transformers both fail through a torchvision built for another torch)
skips the tests that need it, with the reason, and never aborts collection."""
from __future__ import annotations

import importlib

import pytest


def import_or_skip(module: str, *names: str):
    """The module, or the listed attributes of it, imported now; otherwise the calling test module
    is skipped. Lazy packages such as transformers fail only when an attribute is fetched, so the
    names are fetched here too."""
    try:
        imported = importlib.import_module(module)
        found = [getattr(imported, name) for name in names]
    except Exception as exc:  # noqa: BLE001 - any failure to import means: not usable here
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        pytest.skip(f"{module} is not usable here ({type(exc).__name__}: {first})", allow_module_level=True)
    if not names:
        return imported
    return found[0] if len(found) == 1 else found
