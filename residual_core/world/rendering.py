"""The world's samples, glyphs, rendering and captions (see :mod:`residual_core.world`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Iterator, NamedTuple

import numpy as np
import torch
from PIL import Image

WORLD_VERSION = 1
"""Bump when rendering, glyph split, captions or the downstream pool change (keys the
pretraining cache)."""

WORLD_SEED = 20_241_101
"""Seed of everything fixed about the world: the glyph split and the downstream pool."""

CANVAS = 32
"""Side of the square RGB canvas in pixels (the residual-tiny input size)."""

CLASSNAMES: dict[str, list[str]] = {
    "digit": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    "color": ["red", "green", "blue", "yellow", "purple", "white"],
    "background": ["black", "gray", "striped"],
    "position": ["top left", "top right", "bottom left", "bottom right"],
    "size": ["small", "large"],
}
"""Class names of each attribute, in label order (the words captions and prompts use)."""

ATTRIBUTES = tuple(CLASSNAMES)
TASKS = tuple(f"world/{a}" for a in ATTRIBUTES)
"""Names of the registered downstream datasets, one per attribute."""

TEMPLATES: dict[str, list[str]] = {
    "digit": ["a photo of the digit {}.", "the number {}.", "a {}."],
    "color": ["a photo of a {} digit.", "a {} number.", "something {}."],
    "background": ["a digit on a {} background.", "a photo of a number on a {} background."],
    "position": ["a digit in the {}.", "a photo of a number in the {}."],
    "size": ["a {} digit.", "a photo of a {} number."],
}
"""Zero-shot prompt templates of each task (``{}`` = class name)."""

SPLIT_SIZES = {"train": 2400, "val": 600, "test": 1200}
"""Downstream pool sizes; multiples of 60 = lcm of the class counts, so labels are balanced."""

_PRETRAIN_FRACTION = 0.6  # of each digit's glyphs
_INK_RGB = np.array(  # all brighter than every background, so a glyph is always a bright shape
    [[255, 60, 60], [60, 230, 80], [80, 140, 255], [250, 230, 60], [200, 90, 255], [245, 245, 245]],
    dtype=np.float32,
)
_BACKGROUND_RGB = np.array([[10, 10, 10], [80, 80, 80]], dtype=np.float32)  # black, gray
_STRIPE_RGB = np.array([[10, 10, 10], [85, 85, 85]], dtype=np.float32)  # dark / light stripe
_STRIPE_PERIOD = 6  # pixels, along the diagonal
_GLYPH_PX = (16, 24)  # rendered glyph side for small / large (2x, 3x the 8x8 source)
_JITTER_PX = 2  # the glyph moves 0-2 pixels inwards from its corner on each axis
_INK_GAIN = 1.6  # glyph intensity -> opacity: bolder strokes than the raw 0-16 scale
_INK_NOISE, _BACKGROUND_NOISE, _PIXEL_NOISE = 14.0, 8.0, 3.0  # std of colour noise, 0-255 scale


class Sample(NamedTuple):
    """Everything that determines one image: attribute labels, glyph id and jitter seed.

    ``glyph`` indexes :func:`glyphs` and fixes the digit; ``color``, ``background``,
    ``position`` and ``size`` index :data:`CLASSNAMES`; ``seed`` draws the jitter.
    """

    glyph: int
    color: int
    background: int
    position: int
    size: int
    seed: int


@dataclass(frozen=True)
class WorldSamples:
    """A batch of samples as parallel int64 arrays ``[N]`` (the fields of :class:`Sample`)."""

    glyph: np.ndarray
    color: np.ndarray
    background: np.ndarray
    position: np.ndarray
    size: np.ndarray
    seed: np.ndarray

    def __len__(self) -> int:
        return len(self.glyph)

    def __getitem__(self, i: int) -> Sample:
        return Sample(*(int(getattr(self, f.name)[i]) for f in fields(self)))

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def take(self, positions: np.ndarray) -> "WorldSamples":
        """The samples at ``positions`` (int array)."""
        return WorldSamples(**{f.name: getattr(self, f.name)[positions] for f in fields(self)})

    @property
    def digit(self) -> np.ndarray:
        """``[N]`` digit labels (from the glyphs)."""
        return glyphs()[1][self.glyph]

    def labels(self, attribute: str) -> np.ndarray:
        """``[N]`` int64 labels of one attribute (a key of :data:`CLASSNAMES`)."""
        if attribute not in CLASSNAMES:
            raise KeyError(f"unknown attribute {attribute!r}; expected one of {ATTRIBUTES}")
        return np.asarray(getattr(self, attribute), dtype=np.int64)


# ------------------------------------------------------------------------------------- glyphs


@lru_cache(maxsize=1)
def glyphs() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: intensities ``[1797, 8, 8]`` float32 in [0, 1], digits ``[1797]``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    images.flags.writeable = False
    targets = digits.target.astype(np.int64)
    targets.flags.writeable = False
    return images, targets


@lru_cache(maxsize=1)
def glyph_split() -> dict[str, np.ndarray]:
    """Disjoint glyph ids (sorted int64): ``pretrain`` (60% of each digit's) and ``downstream``."""
    targets = glyphs()[1]
    rng = np.random.default_rng(WORLD_SEED)
    parts: dict[str, list[np.ndarray]] = {"pretrain": [], "downstream": []}
    for digit in range(len(CLASSNAMES["digit"])):
        ids = rng.permutation(np.flatnonzero(targets == digit))
        cut = int(round(_PRETRAIN_FRACTION * len(ids)))
        parts["pretrain"].append(ids[:cut])
        parts["downstream"].append(ids[cut:])
    split = {k: np.sort(np.concatenate(v)) for k, v in parts.items()}
    for ids in split.values():
        ids.flags.writeable = False  # cached: shared by every caller
    return split


@lru_cache(maxsize=len(_GLYPH_PX))
def _glyph_alphas(px: int) -> np.ndarray:
    """Opacity of every glyph at ``px x px``: bicubic upsampling, times the ink gain, clipped to
    [0, 1]. ``[1797, px, px]`` float32."""
    images = glyphs()[0]
    out = np.stack([
        np.asarray(Image.fromarray(g, mode="F").resize((px, px), Image.Resampling.BICUBIC))
        for g in images
    ])
    out = np.clip(_INK_GAIN * out, 0.0, 1.0)
    out.flags.writeable = False
    return out


# ---------------------------------------------------------------------------------- rendering


def _background(kind: int, rng: np.random.Generator) -> np.ndarray:
    """``[CANVAS, CANVAS, 3]`` float32 background of one kind, with seeded colour noise."""
    shift = rng.normal(0.0, _BACKGROUND_NOISE, size=3).astype(np.float32)
    if kind < len(_BACKGROUND_RGB):
        return np.broadcast_to(_BACKGROUND_RGB[kind] + shift, (CANVAS, CANVAS, 3)).copy()
    phase = int(rng.integers(_STRIPE_PERIOD))
    yy, xx = np.mgrid[:CANVAS, :CANVAS]
    light = ((xx + yy + phase) // (_STRIPE_PERIOD // 2)) % 2
    return _STRIPE_RGB[light] + shift


def render(sample: Sample) -> np.ndarray:
    """Draw one sample: ``[CANVAS, CANVAS, 3]`` uint8 RGB, a pure function of ``sample``."""
    glyph, color, background, position, size, seed = (int(v) for v in sample)
    rng = np.random.default_rng(seed)
    image = _background(background, rng)
    ink = _INK_RGB[color] + rng.normal(0.0, _INK_NOISE, size=3).astype(np.float32)
    alpha = _glyph_alphas(_GLYPH_PX[size])[glyph][:, :, None]
    px = alpha.shape[0]
    # anchored in the position's corner of the canvas, moved inwards by the jitter
    inward = rng.integers(0, _JITTER_PX + 1, size=2)
    far = np.array([position // 2, position % 2], dtype=bool)  # bottom, right
    top, left = np.where(far, CANVAS - px - inward, inward)
    region = image[top:top + px, left:left + px]
    region[:] = region * (1.0 - alpha) + ink * alpha
    image += rng.normal(0.0, _PIXEL_NOISE, size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_batch(samples: WorldSamples) -> np.ndarray:
    """All ``samples`` rendered: ``[N, CANVAS, CANVAS, 3]`` uint8."""
    out = np.empty((len(samples), CANVAS, CANVAS, 3), dtype=np.uint8)
    for i, sample in enumerate(samples):
        out[i] = render(sample)
    return out


def to_model_input(images: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> normalised float32 ``[N, 3, H, W]``.

    The tensor form of open_clip's eval preprocess for images already at the model's size
    (resize and centre crop are then identities): ``(x / 255 - mean) / std`` per channel. Pass
    ``model.visual.image_mean`` / ``image_std`` so pretraining and extraction see the same input.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.as_tensor(mean, dtype=torch.float32)[:, None, None]
    std = torch.as_tensor(std, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


# ----------------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class CaptionMix:
    """Probability that a pretraining caption mentions each attribute (independently)."""

    digit: float = 0.8
    color: float = 0.6
    background: float = 0.6
    position: float = 0.05  # rare, as CLIP's captions rarely say what EuroSAT or MNIST ask
    size: float = 0.05


_PREFIXES = ("", "a photo of ", "an image of ", "a picture of ")
_NOUNS = ("digit", "number")
_NUMERAL_RATE = 0.25  # a mentioned digit is written "7" rather than "seven"


def caption(sample: Sample, rng: np.random.Generator, mix: CaptionMix = CaptionMix()) -> str:
    """One caption of ``sample`` mentioning a random subset of its attributes (drawn from ``rng``).

    Grammar: ``[prefix] a [size] [color] <digit or noun> [on a <background> background]
    [in the <position>]``, e.g. ``"a small red 3 on a black background in the top left"``,
    ``"a photo of the digit seven"``, ``"something green"``, ``"a picture of a number"``.
    """
    say = {a: rng.random() < getattr(mix, a) for a in ATTRIBUTES}
    adjectives = [CLASSNAMES[a][getattr(sample, a)] for a in ("size", "color") if say[a]]
    if say["digit"]:
        digit = int(glyphs()[1][sample.glyph])
        word = CLASSNAMES["digit"][digit] if rng.random() < 1 - _NUMERAL_RATE else str(digit)
        # alone, the digit is often introduced: "the number 7"
        noun = word if adjectives or rng.random() < 0.5 else f"the {_NOUNS[rng.integers(2)]} {word}"
    elif adjectives and not (say["background"] or say["position"]) and rng.random() < 0.3:
        noun = None  # "something green"
    else:
        noun = _NOUNS[rng.integers(2)]
    if noun is None:
        phrase = " ".join(["something"] + adjectives)
    elif noun.startswith("the "):
        phrase = noun
    else:
        phrase = " ".join(adjectives + [noun])
        phrase = ("an " if phrase.startswith(("8", "eight")) else "a ") + phrase
    if say["background"]:
        phrase += f" on a {CLASSNAMES['background'][sample.background]} background"
    if say["position"]:
        phrase += f" in the {CLASSNAMES['position'][sample.position]}"
    return _PREFIXES[rng.integers(len(_PREFIXES))] + phrase


def captions(samples: WorldSamples, seed: int, mix: CaptionMix = CaptionMix()) -> list[str]:
    """One caption per sample, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    return [caption(s, rng, mix) for s in samples]


# ------------------------------------------------------------------------------------ samples


def _draw(rng: np.random.Generator, n: int, glyph_pool: np.ndarray, balanced: bool) -> WorldSamples:
    """``n`` samples with independent attributes; ``balanced``: every class equally often."""

    def labels(k: int) -> np.ndarray:
        if balanced:
            return rng.permutation(np.resize(np.arange(k), n))
        return rng.integers(k, size=n)

    digit = labels(len(CLASSNAMES["digit"]))
    pool_digits = glyphs()[1][glyph_pool]
    glyph = np.empty(n, dtype=np.int64)
    for d in np.unique(digit):
        candidates = glyph_pool[pool_digits == d]
        glyph[digit == d] = rng.choice(candidates, size=int((digit == d).sum()))
    attrs = {a: labels(len(CLASSNAMES[a])) for a in ATTRIBUTES[1:]}
    seed = rng.integers(0, 2**63 - 1, size=n, dtype=np.int64)
    return WorldSamples(glyph=glyph, seed=seed, **attrs)


def pretraining_samples(n: int, seed: int) -> WorldSamples:
    """``n`` pretraining samples (pretraining glyphs, uniform attributes), deterministic in
    ``seed``."""
    rng = np.random.default_rng([WORLD_SEED, seed])
    return _draw(rng, n, glyph_split()["pretrain"], balanced=False)


@lru_cache(maxsize=1)
def _downstream_pool() -> WorldSamples:
    """The shared downstream pool: splits in :data:`SPLIT_SIZES` order, each balanced."""
    parts = [
        _draw(np.random.default_rng([WORLD_SEED, i + 1]), n, glyph_split()["downstream"], True)
        for i, n in enumerate(SPLIT_SIZES.values())
    ]
    return WorldSamples(**{
        f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(WorldSamples)
    })


def _split_positions(split: str) -> np.ndarray:
    if split not in SPLIT_SIZES:
        raise KeyError(f"unknown split {split!r}; expected one of {tuple(SPLIT_SIZES)}")
    names = list(SPLIT_SIZES)
    start = sum(SPLIT_SIZES[s] for s in names[: names.index(split)])
    return np.arange(start, start + SPLIT_SIZES[split], dtype=np.int64)


def downstream_samples(split: str) -> tuple[WorldSamples, np.ndarray]:
    """One split of the downstream pool: its samples and their ids (positions in the pool)."""
    positions = _split_positions(split)
    return _downstream_pool().take(positions), positions

def task_attribute(name: str) -> str:
    """The attribute a ``world/<attribute>`` task labels."""
    key = name.strip().lower()
    attribute = key.removeprefix("world/")
    if attribute == key or attribute not in CLASSNAMES:
        raise KeyError(f"not a world task: {name!r}; expected one of {TASKS}")
    return attribute


_NUMERALS = tuple(str(d) for d in range(10))


def phrase_attribute(text: str) -> str | None:
    """The attribute a phrase in the world's caption vocabulary names (``"a red digit"`` ->
    ``"color"``, ``"the number 7"`` -> ``"digit"``), or None for a phrase that names none
    (``"a photo"``, ``"a dog"``). Background wins over colour (``"a black background"``)."""
    words = text.lower().replace(",", " ").replace(".", " ").split()
    if "background" in words:
        return "background"
    padded = f" {' '.join(words)} "
    for attribute in ("color", "position", "size", "digit"):
        names = CLASSNAMES[attribute] + (list(_NUMERALS) if attribute == "digit" else [])
        if any(f" {name} " in padded for name in names):
            return attribute
    return None
