"""A JSONL file of image paths with captions, one sample per line:

    {"image": "images/0001.jpg", "caption": "a dog on a beach"}

"image" (or "path") is absolute or relative to the JSONL file's directory; "caption" (or "text") is
the caption. Lines that do not parse or lack a field are counted in `index_errors` and skipped; an
image that cannot be read raises in `load`, and the loader skips and counts it.
"""
from __future__ import annotations

import json
import os

from PIL import Image


class JsonlCaptions:
    """Map-style view of the samples listed in a .jsonl file."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"JSONL file {path!r} does not exist")
        self.path = path
        root = os.path.dirname(os.path.abspath(path))
        self.index_errors = 0
        self.samples: list[tuple[str, str]] = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    image = record.get("image", record.get("path"))
                    caption = record.get("caption", record.get("text"))
                except (json.JSONDecodeError, AttributeError):
                    image = caption = None
                if not isinstance(image, str) or not isinstance(caption, str):
                    self.index_errors += 1
                    continue
                self.samples.append((os.path.join(root, image), caption))
        if not self.samples:
            raise ValueError(f"no valid samples in {path!r}")

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self) -> str:
        return f"{len(self.samples)} samples from {self.path}"

    def locate(self, index: int) -> str:
        """Where sample `index` lives, for error messages: its image file."""
        return self.samples[index][0]

    def load(self, index: int) -> tuple[Image.Image, str]:
        image_path, caption = self.samples[index]
        with Image.open(image_path) as image:
            image.load()
            return image.convert("RGB"), caption
