"""Built-in data: procedurally drawn shapes with captions that describe them.

Each sample is one shape on a smooth two-tone gradient background. Its kind, colour, size and position
are drawn from a generator seeded by (seed, index), so the dataset is deterministic, needs no download,
and every word of the caption that carries information (size, colour, kind, position) can only be
predicted by looking at the image. The background is a linear gradient rather than noise so that the
pixel objective has something learnable: noise is unpredictable after per-patch normalization.

    ds = ShapesDataset(image_size=56, seed=0)
    image, caption = ds.load(3)      # PIL RGB image, "a large red circle in the top left"
    ds.label(3)                      # index of the shape kind, for probes
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

# kinds chosen to stay distinguishable at a few patches across
KINDS = ("circle", "square", "triangle", "cross", "star")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
    "white": (250, 250, 250),
}
# radius as a fraction of the image side
SIZES = {"small": 0.17, "medium": 0.24, "large": 0.32}
# shapes are drawn at this multiple of the image size and shrunk, for anti-aliased edges
SUPERSAMPLE = 4
# 3x3 grid of centre cells, row-major; the phrase names the cell the shape's centre lies in
PLACES = (
    "in the top left", "at the top", "in the top right",
    "on the left", "in the center", "on the right",
    "in the bottom left", "at the bottom", "in the bottom right",
)


class ShapesDataset:
    """`length` samples of (PIL image, caption); index -> sample is a pure function of (seed, index)."""

    def __init__(self, image_size: int, seed: int = 0, length: int = 100_000):
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16 to draw shapes, got {image_size}")
        if length < 1:
            raise ValueError(f"length must be positive, got {length}")
        self.image_size = image_size
        self.seed = seed
        self.length = length

    def __len__(self) -> int:
        return self.length

    def describe(self) -> str:
        return f"built-in shapes ({self.length} samples of {self.image_size} px, seed {self.seed})"

    def _attributes(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        size = list(SIZES)[rng.integers(len(SIZES))]
        place = int(rng.integers(len(PLACES)))
        row, col = divmod(place, 3)
        # centre in the inner half of its grid cell, so the position word is never ambiguous
        cell = self.image_size / 3
        cx = (col + 0.5 + rng.uniform(-0.25, 0.25)) * cell
        cy = (row + 0.5 + rng.uniform(-0.25, 0.25)) * cell
        radius = SIZES[size] * self.image_size * rng.uniform(0.9, 1.1)
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        return {
            "kind": int(rng.integers(len(KINDS))),
            "colour": colour,
            "rgb": np.clip(np.array(COLOURS[colour]) + rng.integers(-15, 16, 3), 0, 255),
            "size": size,
            "place": place,
            "centre": (cx, cy),
            "radius": radius,
            "angle": rng.uniform(-0.25, 0.25),  # radians of rotation for the polygons
            # background: two muted, near-grey tones and a gradient direction
            "bg": rng.integers(60, 171, (2, 1)) + rng.integers(-25, 26, (2, 3)),
            "bg_angle": rng.uniform(0, 2 * math.pi),
        }

    def label(self, index: int) -> int:
        """The shape kind of sample `index` (an index into KINDS)."""
        return self._attributes(index)["kind"]

    def max_caption_tokens(self, tokenizer) -> int:
        """The longest caption this dataset can produce, in `tokenizer` ids (eos included)."""
        return max(
            len(tokenizer.encode(f"a {size} {colour} {kind} {place}"))
            for size in SIZES for colour in COLOURS for kind in KINDS for place in PLACES
        )

    def load(self, index: int) -> tuple[Image.Image, str]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        a = self._attributes(index)
        background = Image.fromarray(_gradient(self.image_size, a["bg"], a["bg_angle"]))
        big = self.image_size * SUPERSAMPLE
        mask = Image.new("L", (big, big), 0)
        centre = (a["centre"][0] * SUPERSAMPLE, a["centre"][1] * SUPERSAMPLE)
        _draw_shape(ImageDraw.Draw(mask), KINDS[a["kind"]], centre, a["radius"] * SUPERSAMPLE, a["angle"], 255)
        mask = mask.resize((self.image_size, self.image_size), Image.BOX)  # coverage per pixel
        shape = Image.new("RGB", background.size, tuple(int(v) for v in a["rgb"]))
        image = Image.composite(shape, background, mask)
        return image, f"a {a['size']} {a['colour']} {KINDS[a['kind']]} {PLACES[a['place']]}"


def _gradient(size: int, tones: np.ndarray, angle: float) -> np.ndarray:
    """(size, size, 3) uint8 linear blend from tones[0] to tones[1] along direction `angle`."""
    coords = (np.arange(size) + 0.5) / size - 0.5
    t = math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None]  # (H, W), in [-0.71, 0.71]
    t = (t / math.sqrt(2) + 0.5)[..., None]
    blend = tones[0] * (1 - t) + tones[1] * t
    return blend.round().astype(np.uint8)


def _polygon(cx: float, cy: float, radii: list[float], angle: float, start: float) -> list[tuple[float, float]]:
    """Vertices at evenly spaced angles (from `start`, rotated by `angle`) and the given radii."""
    n = len(radii)
    return [
        (cx + r * math.cos(start + angle + 2 * math.pi * k / n), cy + r * math.sin(start + angle + 2 * math.pi * k / n))
        for k, r in enumerate(radii)
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, centre: tuple[float, float], r: float, angle: float, fill) -> None:
    cx, cy = centre
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        draw.polygon(_polygon(cx, cy, [r * 1.2] * 4, angle, math.pi / 4), fill=fill)
    elif kind == "triangle":
        draw.polygon(_polygon(cx, cy, [r * 1.2] * 3, angle, -math.pi / 2), fill=fill)
    elif kind == "star":
        draw.polygon(_polygon(cx, cy, [r * 1.25, r * 0.5] * 5, angle, -math.pi / 2), fill=fill)
    elif kind == "cross":
        arm = r * 0.38
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")
