"""Built-in data: procedurally drawn shapes with captions that describe them.

Each sample is one shape on a smooth two-tone gradient background. Its kind, colour, size and position
are drawn from a generator seeded by (seed, index), so the dataset is deterministic, needs no download,
and every word of the caption that carries information (size, colour, kind, position) can only be
predicted by looking at the image. The background is a linear gradient rather than noise so that the
pixel objective has something learnable: noise is unpredictable after per-patch normalization.

    ds = ShapesDataset(image_size=56, seed=0)
    image, caption = ds.load(3)      # PIL RGB image, "a large red circle in the top left"
    ds.label(3)                      # index of the shape kind, for probes

Native mode (patch_size and max_patches given) draws each image at its own size for native-resolution
training: a rectangle of whole patches, at most max_patches of them, with an aspect ratio in [1/2, 2].
The size comes from its own generator, seeded by (seed, index, 1), so a sample's shape, colour and
place are the same as in square mode; positions scale with the width and height, the radius with the
shorter side, and the position words name the 3x3 grid of the rectangle.

    ds = ShapesDataset(56, seed=0, patch_size=14, max_patches=256)
    ds.image_hw(3)                   # (280, 154): (H, W) px, multiples of 14, 20 x 11 patches <= 256
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
# radius as a fraction of the image side (the shorter side in native mode)
SIZES = {"small": 0.17, "medium": 0.24, "large": 0.32}
# shapes are drawn at this multiple of the image size and shrunk, for anti-aliased edges
SUPERSAMPLE = 4
# 3x3 grid of centre cells, row-major; the phrase names the cell the shape's centre lies in
PLACES = (
    "in the top left", "at the top", "in the top right",
    "on the left", "in the center", "on the right",
    "in the bottom left", "at the bottom", "in the bottom right",
)
# the smallest side in pixels that still leaves the shapes recognisable
MIN_SIDE = 16
# native mode: range of aspect ratios (width / height, drawn log-uniform) and of areas, as a fraction
# of max_patches (drawn uniform)
ASPECT_RANGE = (1 / 2, 2)
AREA_RANGE = (1 / 4, 1)


class ShapesDataset:
    """`length` samples of (PIL image, caption); index -> sample is a pure function of (seed, index).

    Square images of `image_size` px, or, with `patch_size` and `max_patches`, images of their own
    sizes (see `image_hw`); `image_size` is then only checked, not used.
    """

    def __init__(self, image_size: int, seed: int = 0, length: int = 100_000, *,
                 patch_size: int | None = None, max_patches: int | None = None):
        if image_size < MIN_SIDE:
            raise ValueError(f"image_size must be at least {MIN_SIDE} to draw shapes, got {image_size}")
        if length < 1:
            raise ValueError(f"length must be positive, got {length}")
        if (patch_size is None) != (max_patches is None):
            raise ValueError(f"patch_size and max_patches must be given together (native mode) or not at all, "
                             f"got patch_size={patch_size}, max_patches={max_patches}")
        self.image_size = image_size
        self.seed = seed
        self.length = length
        self.patch_size = patch_size
        self.max_patches = max_patches
        if patch_size is not None:
            if patch_size < 1:
                raise ValueError(f"patch_size must be positive, got {patch_size}")
            least = max(2, self._min_side() ** 2)
            if max_patches < least:
                raise ValueError(f"max_patches must be at least {least} with patch_size {patch_size} (sides of at "
                                 f"least {MIN_SIDE} px, at least 2 patches), got {max_patches}")

    @property
    def native(self) -> bool:
        return self.max_patches is not None

    def __len__(self) -> int:
        return self.length

    def describe(self) -> str:
        if self.native:
            return (f"built-in shapes ({self.length} samples, mixed sizes up to {self.max_patches} patches of "
                    f"{self.patch_size} px, seed {self.seed})")
        return f"built-in shapes ({self.length} samples of {self.image_size} px, seed {self.seed})"

    def _min_side(self) -> int:
        """Native mode: the fewest patches per side that still give MIN_SIDE pixels."""
        return max(1, math.ceil(MIN_SIDE / self.patch_size))

    def image_hw(self, index: int) -> tuple[int, int]:
        """(H, W) pixels of sample `index`: (image_size, image_size), or in native mode whole patches,
        h * w <= max_patches, each side >= MIN_SIDE px, at least 2 patches."""
        if not self.native:
            return self.image_size, self.image_size
        rng = np.random.default_rng([self.seed, index, 1])  # apart from the attributes' generator
        aspect = math.exp(rng.uniform(math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])))  # width / height
        area = rng.uniform(*AREA_RANGE) * self.max_patches
        least = self._min_side()
        h = max(least, round(math.sqrt(area / aspect)))
        w = max(least, round(math.sqrt(area * aspect)))
        while h * w > self.max_patches:  # rounding up may overshoot; shrink the longer side
            if h > w:
                h -= 1
            else:
                w -= 1
        if h * w < 2:  # a 1x1 grid has nothing to predict after its first patch
            h, w = (h, 2) if aspect >= 1 else (2, w)
        return h * self.patch_size, w * self.patch_size

    def _attributes(self, index: int) -> dict:
        H, W = self.image_hw(index)
        rng = np.random.default_rng([self.seed, index])
        size = list(SIZES)[rng.integers(len(SIZES))]
        place = int(rng.integers(len(PLACES)))
        row, col = divmod(place, 3)
        # centre in the inner half of its grid cell, so the position word is never ambiguous
        cx = (col + 0.5 + rng.uniform(-0.25, 0.25)) * (W / 3)
        cy = (row + 0.5 + rng.uniform(-0.25, 0.25)) * (H / 3)
        radius = SIZES[size] * min(H, W) * rng.uniform(0.9, 1.1)
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
            "hw": (H, W),
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
        H, W = a["hw"]
        background = Image.fromarray(_gradient(H, W, a["bg"], a["bg_angle"]))
        mask = Image.new("L", (W * SUPERSAMPLE, H * SUPERSAMPLE), 0)
        centre = (a["centre"][0] * SUPERSAMPLE, a["centre"][1] * SUPERSAMPLE)
        _draw_shape(ImageDraw.Draw(mask), KINDS[a["kind"]], centre, a["radius"] * SUPERSAMPLE, a["angle"], 255)
        mask = mask.resize((W, H), Image.BOX)  # coverage per pixel
        shape = Image.new("RGB", background.size, tuple(int(v) for v in a["rgb"]))
        image = Image.composite(shape, background, mask)
        return image, f"a {a['size']} {a['colour']} {KINDS[a['kind']]} {PLACES[a['place']]}"


def _gradient(height: int, width: int, tones: np.ndarray, angle: float) -> np.ndarray:
    """(height, width, 3) uint8 linear blend from tones[0] to tones[1] along direction `angle`, in
    coordinates relative to each side, so the blend spans the same range whatever the aspect ratio."""
    xs = (np.arange(width) + 0.5) / width - 0.5
    ys = (np.arange(height) + 0.5) / height - 0.5
    t = math.cos(angle) * xs[None, :] + math.sin(angle) * ys[:, None]  # (H, W), in [-0.71, 0.71]
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
