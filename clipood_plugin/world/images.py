"""A small procedural world of captioned, multi-domain images (numpy + PIL, no downloads).

Why it exists: no CLIP weights and no image datasets can be fetched on the machines this project
is built on, and a newcomer should see CLIPood work on a laptop CPU. So the package carries a world
of its own, shaped like DomainNet / DomainBed: object classes that differ by *geometry* (triangle,
star, house, key, ...) drawn in visual *domains* that differ by *low-level statistics*:

- ``photo``: textured, shaded background, lit object, sensor noise;
- ``sketch``: pencil outline only, on near-white paper;
- ``cartoon``: flat saturated colours, thick black outline;
- ``painting``: blurred brush-stroke texture everywhere, soft edges;
- ``infograph``: cluttered white page, small object, noise.

Inside each domain the nuisances are position, scale, rotation (kept within ±25° so that e.g. a
square never becomes a diamond) and colour. Every sample gets a caption naming domain, colour and
class ("a sketch of a red triangle."), the text a web crawl would pair with the picture; the class
*prompts* used for zero-shot classification are :data:`CLASS_PROMPTS` (one per domain, averaged).

Why fine-tuning with labels can help a domain it never saw (the calibration mechanism): web
captions leave some class boundaries vague. Six classes have a *loose name*
(:data:`LOOSE_NAMES`: a ring is captioned "circle", a frame "square", a hexagon "pentagon", a sun
"star", a mushroom "umbrella", a lightning bolt "arrow") in :data:`LOOSE_NAME_RATE` = 60 % of their
captions. Contrastive pretraining then pulls ring images toward the text "circle": with the
default tiny CLIP, zero-shot gives 8-36 % of a loose-named class's images its loose name
(ring 8 %, frame 36 %) and is less accurate on those classes than on the rest in *every* domain
(e.g. cartoon 56 % against 70 %), although the image features must tell the shapes apart (the
other 40 % of captions need it). Labels fix the boundary, and since the pair differs by shape,
not by style, the fix can carry over to a held-out domain. Against it works the
usual cost of fine-tuning on a few domains: features the sources never exercise (the outline-only
sketches, the small cluttered infographs) are overwritten. Which wins depends on the held-out
domain, as on DomainBed; ``recipes/ood_benchmark.py`` measures both, leaving each domain out.
Every domain is in the pretraining pool in equal share, as every DomainNet style is on the web.

Determinism: sample ``i`` of (class, domain) in a split draws from its own
``numpy.random.default_rng([seed, split_seed, class, domain, i])`` stream, so the same
``WorldSpec`` and split seed give identical pixels, in any order (and identical PNG bytes under
the same Pillow/zlib). Change :data:`GENERATOR_VERSION` whenever a change here alters any pixel
or caption: caches of models pretrained on the world are keyed by it.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "CAPTION_TEMPLATES",
    "CLASSNAMES",
    "CLASS_PROMPT",
    "CLASS_PROMPTS",
    "COLOURS",
    "DOMAINS",
    "GENERATOR_VERSION",
    "LOOSE_NAMES",
    "LOOSE_NAME_RATE",
    "SPLITS",
    "WorldSpec",
    "WorldTensors",
    "caption",
    "iter_samples",
    "make_tensors",
    "render",
    "write_world_shards",
]

#: Bump whenever a change to this module changes any generated pixel or caption.
GENERATOR_VERSION = 2

#: Conventional split seeds: disjoint random streams of the same world.
SPLITS: dict[str, int] = {"pretrain": 0, "train": 1, "val": 2, "test": 3}

#: CLIP's plain prompt, one template (CLIPood's choice for DomainBed).
CLASS_PROMPT = "a photo of a {}."
#: The world's zero-shot prompt ensemble: one prompt per domain, as OpenAI's ImageNet ensemble
#: names the styles ("a sketch of a {}.", "a painting of a {}.", ...). Embeddings are averaged
#: over the prompts. With the default tiny CLIP the photo prompt alone is weakest on the domains
#: it does not name (see the README); the ensemble keeps every domain above 10x chance.
CLASS_PROMPTS: tuple[str, ...] = (
    "a photo of a {}.",
    "a sketch of a {}.",
    "a cartoon of a {}.",
    "a painting of a {}.",
    "an infograph of a {}.",
)

#: Caption templates (fields: article+domain, article+colour, class); all name all three.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{a_domain} of {a_colour} {cls}.",
    "{a_colour} {cls} in {domain} style.",
    "{domain}: {a_colour} {cls}.",
    "this {domain} shows {a_colour} {cls}.",
)

#: Loose web names: the caption of an image of the key class names the value class instead, with
#: probability :data:`LOOSE_NAME_RATE`. Web text calls a ring a circle and a frame a square far
#: more often than it uses the precise word; labels later fix these boundaries, and because the
#: classes differ by shape they stay fixed in every domain. See the module docstring.
LOOSE_NAMES: dict[str, str] = {
    "ring": "circle",
    "frame": "square",
    "hexagon": "pentagon",
    "sun": "star",
    "mushroom": "umbrella",
    "lightning": "arrow",
}
#: Probability that a caption of a :data:`LOOSE_NAMES` class uses the loose name.
LOOSE_NAME_RATE = 0.6

#: Named colours (RGB); each sample jitters its colour a little around one of these.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 205, 30),
    "orange": (255, 127, 14),
    "purple": (128, 60, 170),
    "pink": (240, 120, 190),
    "brown": (140, 86, 50),
}

_SUPERSAMPLE = 4  # masks are drawn at 4x resolution and box-filtered down, for anti-aliasing

# ---------------------------------------------------------------------------------------------
# Shapes: each is a list of (polygon, fill) in a unit frame, y pointing down, roughly within
# [-1, 1]^2. fill=1 adds to the mask, fill=0 cuts a hole; parts are drawn in order.
# ---------------------------------------------------------------------------------------------
_Poly = list[tuple[float, float]]
_Shape = list[tuple[_Poly, int]]


def _ellipse(cx: float, cy: float, rx: float, ry: float, a0: float = 0.0, a1: float = 360.0,
             n: int = 48) -> _Poly:
    ts = np.linspace(math.radians(a0), math.radians(a1), n, endpoint=a1 - a0 < 360)
    return [(cx + rx * math.cos(t), cy + ry * math.sin(t)) for t in ts]


def _regular(n: int, r: float = 1.0, phase: float = -90.0) -> _Poly:
    return [(r * math.cos(math.radians(phase + 360 * k / n)), r * math.sin(math.radians(phase + 360 * k / n)))
            for k in range(n)]


def _rect(x0: float, y0: float, x1: float, y1: float) -> _Poly:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _star(points: int, r_out: float, r_in: float) -> _Poly:
    out: _Poly = []
    for k in range(2 * points):
        r = r_out if k % 2 == 0 else r_in
        t = math.radians(-90 + 180 * k / points)
        out.append((r * math.cos(t), r * math.sin(t)))
    return out


def _heart() -> _Poly:
    ts = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    return [(math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                 - math.cos(4 * t)) / 16 - 0.05) for t in ts]


def _sun() -> _Shape:
    parts: _Shape = [(_ellipse(0, 0, 0.5, 0.5), 1)]
    for k in range(8):
        t = math.radians(45 * k)
        c, s = math.cos(t), math.sin(t)
        parts.append(([(0.62 * c - 0.1 * s, 0.62 * s + 0.1 * c), (1.0 * c, 1.0 * s),
                       (0.62 * c + 0.1 * s, 0.62 * s - 0.1 * c)], 1))
    return parts


def _flower() -> _Shape:
    parts: _Shape = []
    for k in range(6):
        t = math.radians(60 * k)
        parts.append((_ellipse(0.55 * math.cos(t), 0.55 * math.sin(t), 0.38, 0.38, n=24), 1))
    parts.append((_ellipse(0, 0, 0.2, 0.2, n=16), 0))
    return parts


def _ladder() -> _Shape:
    parts: _Shape = [(_rect(-0.6, -1, -0.4, 1), 1), (_rect(0.4, -1, 0.6, 1), 1)]
    parts += [(_rect(-0.4, y - 0.08, 0.4, y + 0.08), 1) for y in (-0.6, 0.0, 0.6)]
    return parts


_SHAPES: dict[str, Callable[[], _Shape]] = {
    "circle": lambda: [(_ellipse(0, 0, 0.9, 0.9), 1)],
    "ring": lambda: [(_ellipse(0, 0, 0.95, 0.95), 1), (_ellipse(0, 0, 0.55, 0.55), 0)],
    "square": lambda: [(_rect(-0.8, -0.8, 0.8, 0.8), 1)],
    "frame": lambda: [(_rect(-0.85, -0.85, 0.85, 0.85), 1), (_rect(-0.45, -0.45, 0.45, 0.45), 0)],
    "triangle": lambda: [(_regular(3, 1.0, -90), 1)],
    "diamond": lambda: [([(0, -1), (0.55, 0), (0, 1), (-0.55, 0)], 1)],
    "pentagon": lambda: [(_regular(5, 0.95), 1)],
    "hexagon": lambda: [(_regular(6, 0.95, 0), 1)],
    "star": lambda: [(_star(5, 1.0, 0.42), 1)],
    "cross": lambda: [(_rect(-0.22, -0.9, 0.22, 0.9), 1), (_rect(-0.9, -0.22, 0.9, 0.22), 1)],
    "arrow": lambda: [([(-0.95, -0.18), (0.2, -0.18), (0.2, -0.55), (0.95, 0), (0.2, 0.55), (0.2, 0.18),
                        (-0.95, 0.18)], 1)],
    "heart": lambda: [(_heart(), 1)],
    "crescent": lambda: [(_ellipse(0, 0, 0.9, 0.9), 1), (_ellipse(0.45, -0.2, 0.75, 0.75), 0)],
    "house": lambda: [(_rect(-0.65, -0.05, 0.65, 0.9), 1), ([(-0.9, 0.0), (0, -0.9), (0.9, 0.0)], 1)],
    "tree": lambda: [([(0, -1), (0.75, 0.45), (-0.75, 0.45)], 1), (_rect(-0.15, 0.4, 0.15, 1.0), 1)],
    "flower": _flower,
    "sun": _sun,
    "hourglass": lambda: [([(-0.7, -0.95), (0.7, -0.95), (0.08, 0), (0.7, 0.95), (-0.7, 0.95), (-0.08, 0)], 1)],
    "lightning": lambda: [([(0.15, -1), (0.6, -1), (0.15, -0.15), (0.55, -0.15), (-0.35, 1), (-0.05, 0.1),
                            (-0.45, 0.1)], 1)],
    "key": lambda: [(_ellipse(-0.55, 0, 0.4, 0.4), 1), (_ellipse(-0.55, 0, 0.18, 0.18), 0),
                    (_rect(-0.2, -0.1, 0.95, 0.1), 1), (_rect(0.55, 0.1, 0.7, 0.4), 1),
                    (_rect(0.8, 0.1, 0.95, 0.35), 1)],
    "umbrella": lambda: [(_ellipse(0, 0, 0.95, 0.75, 180, 360, n=32), 1), (_rect(-0.07, -0.05, 0.07, 0.75), 1),
                         (_ellipse(-0.22, 0.75, 0.22, 0.22, 0, 180, n=16)
                          + _ellipse(-0.22, 0.75, 0.08, 0.08, 180, 0, n=8)[::-1], 1)],
    "mushroom": lambda: [(_ellipse(0, -0.05, 0.95, 0.8, 180, 360, n=32), 1), (_rect(-0.25, -0.1, 0.25, 0.9), 1)],
    "fish": lambda: [(_ellipse(-0.15, 0, 0.65, 0.42), 1), ([(0.4, 0), (0.95, -0.45), (0.95, 0.45)], 1),
                     (_ellipse(-0.45, -0.08, 0.09, 0.09, n=12), 0)],
    "ladder": _ladder,
}

#: The default classes, in label order.
CLASSNAMES: tuple[str, ...] = tuple(_SHAPES)
#: The default domains, in id order.
DOMAINS: tuple[str, ...] = ("photo", "sketch", "cartoon", "painting", "infograph")


@dataclass(frozen=True)
class WorldSpec:
    """What to generate: which classes and domains, how big, how many, from which seed.

    Labels are indices into ``classes``; domain ids are indices into ``domains``. The spec is
    hashed (with :data:`GENERATOR_VERSION`) to key caches, so it holds only plain values.
    """

    classes: tuple[str, ...] = CLASSNAMES
    domains: tuple[str, ...] = DOMAINS
    image_size: int = 32
    samples_per_class_domain: int = 40
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "domains", tuple(self.domains))
        _check_names(self.classes, CLASSNAMES, "class")
        _check_names(self.domains, DOMAINS, "domain")
        if not isinstance(self.image_size, int) or not 16 <= self.image_size <= 256:
            raise ValueError(f"image_size must be an int in [16, 256], got {self.image_size!r}")
        if not isinstance(self.samples_per_class_domain, int) or self.samples_per_class_domain < 1:
            raise ValueError(f"samples_per_class_domain must be a positive int, got {self.samples_per_class_domain!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (lists for tuples), plus the generator version, for cache keys."""
        d = asdict(self)
        d["classes"], d["domains"] = list(self.classes), list(self.domains)
        d["generator_version"] = GENERATOR_VERSION
        return d


def _check_names(names: tuple[str, ...], known: tuple[str, ...], what: str) -> None:
    if not names:
        raise ValueError(f"need at least one {what}, got none")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {what} name(s) {unknown}; known: {list(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate {what} names in {list(names)}")


def _resolve(value: int | str, known: tuple[str, ...], what: str) -> str:
    if isinstance(value, str):
        if value not in known:
            raise ValueError(f"unknown {what} {value!r}; known: {list(known)}")
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if not 0 <= value < len(known):
            raise ValueError(f"{what} index {value} out of range [0, {len(known)})")
        return known[int(value)]
    raise TypeError(f"{what} must be an int index or a name, got {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _mask(shape: str, size: int, cx: float, cy: float, radius: float, angle: float) -> Image.Image:
    """Supersampled binary mask ('L', ``size * _SUPERSAMPLE`` square) of one placed shape."""
    big = size * _SUPERSAMPLE
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    c, s = math.cos(angle), math.sin(angle)
    for poly, fill in _SHAPES[shape]():
        pts = [((cx + radius * (c * x - s * y)) * _SUPERSAMPLE, (cy + radius * (s * x + c * y)) * _SUPERSAMPLE)
               for x, y in poly]
        draw.polygon(pts, fill=255 * fill)
    return img


def _down(big: Image.Image, size: int) -> np.ndarray:
    """Box-filter a supersampled 'L' image down to ``size`` and return floats in [0, 1]."""
    return np.asarray(big.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _maxpool(a: np.ndarray, r: int) -> np.ndarray:
    """Grey dilation of a 2-D array by a (2r+1)-square, separably (PIL's MaxFilter is ~10x slower)."""
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(a, pad, mode="edge")
        n = a.shape[axis]
        out = p.take(range(0, n), axis=axis)
        for k in range(1, 2 * r + 1):
            out = np.maximum(out, p.take(range(k, k + n), axis=axis))
        a = out
    return a


def _band(big: Image.Image, width: int) -> Image.Image:
    """Outline band of a supersampled mask: dilation minus erosion, ``width`` supersampled pixels each way."""
    m = np.asarray(big, dtype=np.int16)
    band = _maxpool(m, width) + _maxpool(-m, width)  # dilation - erosion
    return Image.fromarray(band.clip(0, 255).astype(np.uint8))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a ``cells`` x ``cells`` random grid upsampled bilinearly."""
    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    up = Image.fromarray(grid).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(up, dtype=np.float32) / 255.0


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.normal(0, amount, 3), 0, 255)


def _composite(base: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Alpha-blend a colour (per-pixel [H,W,3] or [3]) onto ``base`` [H,W,3] through ``mask`` [H,W]."""
    a = mask[..., None]
    return base * (1 - a) + colour * a


def _strokes(rng: np.random.Generator, size: int, n: int, palette: np.ndarray, width: tuple[int, int]) -> Image.Image:
    """An RGB canvas of ``n`` random straight brush strokes in colours near ``palette`` rows."""
    img = Image.new("RGB", (size, size), tuple(int(v) for v in palette[0]))
    draw = ImageDraw.Draw(img)
    for _ in range(n):
        x0, y0 = rng.uniform(-4, size + 4, 2)
        t = rng.uniform(0, math.pi)
        length = rng.uniform(size * 0.15, size * 0.5)
        col = _jitter(tuple(palette[rng.integers(len(palette))]), rng, 18)
        draw.line([(x0, y0), (x0 + length * math.cos(t), y0 + length * math.sin(t))],
                  fill=tuple(int(v) for v in col), width=int(rng.integers(width[0], width[1] + 1)))
    return img


def render(class_idx: int | str, domain_idx: int | str, rng: np.random.Generator, *,
           colour: str | None = None, image_size: int = 32) -> Image.Image:
    """Draw one RGB image of a class in a domain, with random placement, scale, rotation and colour.

    ``class_idx`` / ``domain_idx`` are names or indices into :data:`CLASSNAMES` / :data:`DOMAINS`.
    ``colour`` is a key of :data:`COLOURS`; ``None`` draws one from ``rng``. Every random choice
    comes from ``rng``, so a seeded generator reproduces the image exactly.
    """
    shape = _resolve(class_idx, CLASSNAMES, "class")
    domain = _resolve(domain_idx, DOMAINS, "domain")
    if colour is None:
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    elif colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; known: {list(COLOURS)}")
    if not isinstance(image_size, int) or not 16 <= image_size <= 256:
        raise ValueError(f"image_size must be an int in [16, 256], got {image_size!r}")
    size = image_size
    rgb = _jitter(COLOURS[colour], rng, 12)

    # Placement: infographs hold a small object anywhere; other domains a large, roughly centred one.
    small = domain == "infograph"
    radius = size * (rng.uniform(0.28, 0.36) if small else rng.uniform(0.3, 0.42))
    margin = radius * 1.02
    spread = size / 2 - margin if small else size * 0.1
    cx = size / 2 + rng.uniform(-spread, spread)
    cy = size / 2 + rng.uniform(-spread, spread)
    angle = math.radians(rng.uniform(-25, 25))
    big = _mask(shape, size, cx, cy, radius, angle)
    mask = _down(big, size)

    if domain == "photo":
        # Two-tone textured, gently lit background; object lit from a random side; sensor noise.
        bg_a = rng.uniform(60, 200, 3)
        bg_b = np.clip(bg_a + rng.normal(0, 40, 3), 0, 255)
        tex = _smooth_noise(rng, size, 5)[..., None]
        fine = _smooth_noise(rng, size, 12)[..., None]
        base = bg_a * (1 - tex) + bg_b * tex + (fine - 0.5) * 30
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        t = rng.uniform(0, 2 * math.pi)
        light = 0.75 + 0.5 * ((xx - 0.5) * math.cos(t) + (yy - 0.5) * math.sin(t))
        obj = rgb[None, None, :] * light[..., None]
        out = _composite(base, mask, obj)
        # Soft drop shadow down-right of the object.
        shadow = np.roll(np.roll(mask, 1, axis=0), 1, axis=1) * (1 - mask) * 0.35
        out = out * (1 - shadow[..., None])
        out = out + rng.normal(0, 7, out.shape)
        img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.4))
    elif domain == "sketch":
        # Pencil outline only, drawn twice with a small wobble, on slightly tinted paper.
        paper = np.full((size, size, 3), 248.0) + rng.normal(0, 3, 3)
        pencil = rgb * 0.6 + 40
        line = _down(_band(big, max(1, (3 * _SUPERSAMPLE) // 4)), size)
        wobble = _down(_band(_mask(shape, size, cx + rng.uniform(-0.7, 0.7), cy + rng.uniform(-0.7, 0.7),
                                   radius * rng.uniform(0.97, 1.03), angle + rng.uniform(-0.06, 0.06)),
                             max(1, _SUPERSAMPLE // 4)), size)
        ink = np.clip(0.85 * line + 0.5 * wobble, 0, 1)
        out = _composite(paper, ink, pencil)
        out = out + rng.normal(0, 2.5, out.shape)
        img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    elif domain == "cartoon":
        # Flat pastel background, flat saturated object (no shading, no noise), thick black outline.
        bg = np.clip(rng.uniform(170, 255, 3), 0, 255)
        sat = np.clip((rgb - rgb.mean()) * 1.4 + rgb.mean(), 0, 255)
        out = _composite(np.broadcast_to(bg, (size, size, 3)).astype(np.float32), mask, sat)
        outline = _down(_band(big, _SUPERSAMPLE), size)
        out = _composite(out, np.clip(outline * 1.2, 0, 1), np.asarray([20.0, 20.0, 20.0]))
        img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    elif domain == "painting":
        # Brush strokes for both canvas and object, then a blur that softens every edge.
        canvas_pal = np.clip(rng.uniform(90, 200) + rng.normal(0, 30, (3, 3)), 0, 255)  # muted canvas
        canvas = np.asarray(_strokes(rng, size, 30, canvas_pal, (2, 4)), np.float32)
        obj_pal = np.stack([rgb, np.clip(rgb * 0.75, 0, 255), np.clip(rgb * 1.15 + 20, 0, 255)])
        obj = np.asarray(_strokes(rng, size, 40, obj_pal, (1, 3)), np.float32)
        soft = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.8)),
                          np.float32) / 255.0
        out = _composite(canvas, soft, obj)
        img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7))
    else:  # infograph
        # White page cluttered with bars, text-like dashes and blocks; the object is one small item.
        page = Image.new("RGB", (size, size), (250, 250, 246))
        draw = ImageDraw.Draw(page)
        for _ in range(int(rng.integers(5, 9))):
            col = tuple(int(v) for v in np.clip(rng.uniform(120, 220) + rng.normal(0, 25, 3), 0, 255))  # muted
            kind = int(rng.integers(3))
            x0, y0 = (float(v) for v in rng.uniform(0, size, 2))
            if kind == 0:  # bar of a chart
                draw.rectangle([x0, y0, x0 + rng.uniform(1, 3), min(size, y0 + rng.uniform(3, 12))], fill=col)
            elif kind == 1:  # a line of "text"
                draw.line([(x0, y0), (x0 + rng.uniform(4, 12), y0)], fill=(90, 90, 90), width=1)
            else:  # a small block
                draw.rectangle([x0, y0, x0 + rng.uniform(2, 5), y0 + rng.uniform(2, 5)], fill=col)
        out = _composite(np.asarray(page, np.float32), mask, rgb)
        out = out + rng.normal(0, 10, out.shape)
        img = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    return img


# ---------------------------------------------------------------------------------------------
# Captions and samples
# ---------------------------------------------------------------------------------------------


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def caption(class_name: str, domain: str, colour: str, template: int = 0) -> str:
    """Caption naming domain, colour and class, e.g. ``"a sketch of a red triangle."``."""
    if not 0 <= template < len(CAPTION_TEMPLATES):
        raise ValueError(f"template must be in [0, {len(CAPTION_TEMPLATES)}), got {template}")
    return CAPTION_TEMPLATES[template].format(a_domain=_a(domain), a_colour=_a(colour), domain=domain, cls=class_name)


class _Draw(NamedTuple):
    key: str
    label: int
    domain_id: int
    image: Image.Image
    caption: str


def _draws(spec: WorldSpec, split_seed: int, domains: Sequence[str] | None,
           samples_per_class_domain: int | None) -> Iterator[_Draw]:
    if not isinstance(split_seed, int) or split_seed < 0:
        raise ValueError(f"split_seed must be a non-negative int, got {split_seed!r}")
    names = spec.domains if domains is None else tuple(domains)
    for d in names:
        if d not in spec.domains:
            raise ValueError(f"domain {d!r} is not in the spec's domains {list(spec.domains)}")
    n = spec.samples_per_class_domain if samples_per_class_domain is None else samples_per_class_domain
    if n < 0:
        raise ValueError(f"samples_per_class_domain must be >= 0, got {n}")
    colours = list(COLOURS)
    for d in names:
        d_id = spec.domains.index(d)
        d_global = DOMAINS.index(d)
        for label, cls in enumerate(spec.classes):
            c_global = CLASSNAMES.index(cls)
            for i in range(n):
                rng = np.random.default_rng([spec.seed, split_seed, c_global, d_global, i])
                colour = colours[int(rng.integers(len(colours)))]
                img = render(cls, d, rng, colour=colour, image_size=spec.image_size)
                template = int(rng.integers(len(CAPTION_TEMPLATES)))
                name = LOOSE_NAMES[cls] if cls in LOOSE_NAMES and rng.random() < LOOSE_NAME_RATE else cls
                text = caption(name, d, colour, template)
                yield _Draw(f"s{split_seed}_{d}_{cls}_{i:06d}", label, d_id, img, text)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def iter_samples(spec: WorldSpec, split_seed: int = SPLITS["train"], *, domains: Sequence[str] | None = None,
                 samples_per_class_domain: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield samples in the shard-writer format, domain by domain, class by class.

    Each is ``{"__key__": str, "png": bytes, "cls": int, "domain": str, "txt": caption}``;
    ``cls`` indexes ``spec.classes``. ``domains`` restricts to a subset of ``spec.domains``;
    ``samples_per_class_domain`` overrides the spec's count. Different ``split_seed`` values
    (see :data:`SPLITS`) are independent draws of the same world.
    """
    for draw in _draws(spec, split_seed, domains, samples_per_class_domain):
        domain = spec.domains[draw.domain_id]
        yield {"__key__": draw.key, "png": _png(draw.image), "cls": draw.label, "domain": domain, "txt": draw.caption}


class WorldTensors(NamedTuple):
    """An in-memory split: ``images`` uint8 [N,3,H,W], ``labels`` and ``domains`` int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    domains: torch.Tensor
    captions: list[str]


def make_tensors(spec: WorldSpec, split_seed: int = SPLITS["train"], *, domains: Sequence[str] | None = None,
                 samples_per_class_domain: int | None = None, progress: bool = False) -> WorldTensors:
    """Generate a split straight into tensors (same pixels as :func:`iter_samples`, no PNG round trip).

    ``domains`` ids index ``spec.domains``. Use :func:`clipood_plugin.world.tiny_clip.to_model_input`
    (or the model's ``preprocess`` on PIL images) to normalise for a model.
    """
    names = spec.domains if domains is None else tuple(domains)
    n = spec.samples_per_class_domain if samples_per_class_domain is None else samples_per_class_domain
    total = len(names) * len(spec.classes) * n
    images = torch.empty((total, 3, spec.image_size, spec.image_size), dtype=torch.uint8)
    labels = torch.empty(total, dtype=torch.int64)
    dom = torch.empty(total, dtype=torch.int64)
    captions: list[str] = []
    draws = _draws(spec, split_seed, names, n)
    if progress:
        from rich.progress import track

        draws = track(draws, total=total, description=f"generating {total} images")
    for k, draw in enumerate(draws):
        images[k] = torch.from_numpy(np.asarray(draw.image, dtype=np.uint8).copy()).permute(2, 0, 1)
        labels[k], dom[k] = draw.label, draw.domain_id
        captions.append(draw.caption)
    return WorldTensors(images, labels, dom, captions)


def write_world_shards(spec: WorldSpec, out_dir: str | os.PathLike[str], split: str = "train", *,
                       domains: Sequence[str] | None = None, samples_per_class_domain: int | None = None,
                       **writer_kwargs: Any) -> Any:
    """Write one split of the world as WebDataset shards with the project's shard writer.

    ``split`` names a seed in :data:`SPLITS`; extra keyword arguments go to
    :func:`clipood_plugin.data.make_shards.write_shards`, whose return value is passed back.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
    from clipood_plugin.data.make_shards import write_shards  # the data layer is optional here

    samples = iter_samples(spec, SPLITS[split], domains=domains, samples_per_class_domain=samples_per_class_domain)
    n = spec.samples_per_class_domain if samples_per_class_domain is None else samples_per_class_domain
    writer_kwargs.setdefault("total", len(spec.domains if domains is None else domains) * len(spec.classes) * n)
    return write_shards(samples, out_dir, classnames=list(spec.classes), split=split, **writer_kwargs)
