"""WebDataset-style tar shards of (image, caption) pairs, read by random access.

A shard holds files grouped into samples by key: the member name up to the first dot of its base name
(`000123.jpg` and `000123.txt` form sample `000123`). A sample needs one image (jpg, jpeg, png, webp,
bmp) and one caption (txt or caption, or json with a "caption" or "text" field).

The shards are indexed once at start-up (tar headers only; data is skipped), which gives every sample
a fixed index: the loader can then shuffle, split across ranks and resume at an exact position.
Members without a partner and a shard that ends early are counted in `index_errors` and skipped; a
sample whose bytes do not decode raises in `load`, and the loader skips and counts it.
"""
from __future__ import annotations

import glob
import io
import json
import os
import tarfile
import warnings
from dataclasses import dataclass

from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
CAPTION_EXTS = ("txt", "caption", "json")


@dataclass(frozen=True)
class _Member:
    shard: int
    offset: int  # byte offset of the member's data in the shard
    size: int


def list_shards(path: str) -> list[str]:
    """A .tar file, or every .tar below a directory (sorted)."""
    if os.path.isdir(path):
        shards = sorted(glob.glob(os.path.join(path, "**", "*.tar"), recursive=True))
        if not shards:
            raise FileNotFoundError(f"no .tar shards found under {path!r}")
        return shards
    if os.path.isfile(path) and path.endswith(".tar"):
        return [path]
    raise FileNotFoundError(f"{path!r} is neither a .tar shard nor a directory of shards")


def _split_key(name: str) -> tuple[str, str]:
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem), ext.lower()


class TarShards:
    """Map-style view of the samples in a list of tar shards."""

    def __init__(self, path: str):
        self.shards = list_shards(path)
        self.index_errors = 0
        self.samples: list[tuple[_Member, _Member, str]] = []  # (image, caption, caption ext)
        for shard_id, shard in enumerate(self.shards):
            self._index_shard(shard_id, shard)
        if not self.samples:
            raise ValueError(f"no complete (image, caption) samples in {path!r}")
        self._files: dict[int, io.BufferedReader] = {}

    def _index_shard(self, shard_id: int, shard: str) -> None:
        groups: dict[str, dict[str, _Member]] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                for info in tar:
                    if info.isfile():
                        key, ext = _split_key(info.name)
                        groups.setdefault(key, {})[ext] = _Member(shard_id, info.offset_data, info.size)
        except (tarfile.TarError, OSError) as exc:
            # a truncated or damaged shard: keep what was indexed before the damage
            warnings.warn(f"shard {shard!r} is damaged after {len(groups)} samples ({exc}); using those", stacklevel=2)
            self.index_errors += 1
        for key, parts in groups.items():
            image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
            cap_ext = next((e for e in CAPTION_EXTS if e in parts), None)
            if image is None or cap_ext is None:
                self.index_errors += 1
                continue
            self.samples.append((image, parts[cap_ext], cap_ext))

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self) -> str:
        return f"{len(self.samples)} samples in {len(self.shards)} tar shard(s)"

    def _read(self, member: _Member) -> bytes:
        # one open file per shard per process (each loader worker gets its own copy of this object)
        handle = self._files.get(member.shard)
        if handle is None:
            handle = self._files[member.shard] = open(self.shards[member.shard], "rb")
        handle.seek(member.offset)
        data = handle.read(member.size)
        if len(data) != member.size:
            raise OSError(f"short read in {self.shards[member.shard]!r} at byte {member.offset}")
        return data

    def locate(self, index: int) -> str:
        """Where sample `index` lives, for error messages: its shard and the image's byte offset."""
        image = self.samples[index][0]
        return f"{self.shards[image.shard]} at byte {image.offset}"

    def load(self, index: int) -> tuple[Image.Image, str]:
        image_member, caption_member, cap_ext = self.samples[index]
        caption = self._read(caption_member).decode("utf-8").strip()
        if cap_ext == "json":
            record = json.loads(caption)
            caption = str(record.get("caption", record.get("text", "")))
        image = Image.open(io.BytesIO(self._read(image_member)))
        image.load()  # decode now, so a damaged file fails here and not later in the transform
        return image.convert("RGB"), caption

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = {}  # file handles do not cross process boundaries
        return state
