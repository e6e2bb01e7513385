"""Test-only: lets torchvision's Python parts (and so timm, and transformers, which imports
torchvision when it is installed) import next to a torch its compiled ops were not built for.

The torchvision wheel that pairs with the pinned CPU torch is a CUDA build; its C++ ops library does
not load, and torchvision then fails at import while registering fake kernels for ops that do not
exist ("operator torchvision::nms does not exist"). Defining those ops' schemas with torch.library
first lets the import finish. The ops themselves stay unimplemented (calling one raises); nothing
the tests use needs them. Where torchvision is absent or imports fine, this does nothing.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import sys

import torch

# the ops torchvision registers fake kernels for whether or not its C++ library loaded
SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_MISSING = re.compile(r"operator torchvision::(\w+) does not exist")
_LIBRARY = None  # kept alive: the definitions vanish when the Library object is collected
DEFINED: list[str] = []  # what was defined, for the test report


def install() -> str:
    """Import torchvision, defining the missing op schemas it needs; returns what happened, in words."""
    global _LIBRARY
    if importlib.util.find_spec("torchvision") is None:
        return "torchvision is not installed"
    for _ in range(len(SCHEMAS) + 1):
        try:
            importlib.import_module("torchvision")
            return f"torchvision imports (op schemas defined here: {', '.join(DEFINED) or 'none'})"
        except RuntimeError as exc:
            match = _MISSING.search(str(exc))
            if match is None or match.group(1) not in SCHEMAS or match.group(1) in DEFINED:
                raise
            # drop the half-imported package so the next import starts over
            for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
                del sys.modules[name]
            _LIBRARY = _LIBRARY or torch.library.Library("torchvision", "FRAGMENT")
            _LIBRARY.define(SCHEMAS[match.group(1)])
            DEFINED.append(match.group(1))
    raise RuntimeError("torchvision still does not import after defining " + ", ".join(DEFINED))
