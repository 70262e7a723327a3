"""Read what a demo image shows (shape, colour, size): the utility half of the check.

For SD the literature asks CLIP whether an image still shows what the prompt asks for; the demo's
images are simple enough for a small reader. Generated images come out of the model's decoder,
which blurs edges, erases fine texture and shifts colours towards the background, so the reader
is calibrated on that decoder: it renders fresh demo images, passes them through the decoder
(`decode`, e.g. a VAE round trip), and fits one k-nearest-neighbour classifier per attribute on
two simple features: the foreground and background colours (colour), and the map of each
pixel's distance to the background, centred on its centre of mass (shape, size).
`accuracy` on further round trips says how far the reader can be trusted, attribute by attribute.
Texture is not read: the demo's VAE erases it (a round trip of a checkered square is a plain
one), so no generated image can show it. The same holds, measured rather than assumed, for what
`readable` finds the reader cannot read on the decoder's own round trips: on demo v3 the shape of
a small object is read right in under half of them (a 10-pixel circle, square and diamond come
back as the same blur), so it is no test of a generation either.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.neighbors import KNeighborsClassifier

from memscan.demo.data import SIZES, Attributes, render, sample_attributes

ATTRIBUTES = ("shape", "colour", "size")
Decode = Callable[[np.ndarray], np.ndarray]


def colour_features(images: np.ndarray) -> np.ndarray:
    """(N, 6): mean colour of the 10% of pixels farthest from the background, and the background
    (the median border colour): the decoder's rendition of a colour depends on both."""
    border = np.concatenate([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], axis=2)
    background = np.median(border, axis=2)  # (N, 3)
    distance = _distance(images, background).reshape(len(images), -1)
    far = distance >= np.quantile(distance, 0.9, axis=1, keepdims=True)
    pixels = images.reshape(len(images), 3, -1)
    foreground = (pixels * far[:, None]).sum(2) / far.sum(1, keepdims=True)
    return np.concatenate([foreground, background], axis=1)


def shape_features(images: np.ndarray) -> np.ndarray:
    """(N, H*W): distance to the background per pixel, scaled to max 1, rolled so that its centre
    of mass sits in the middle (the position is not an attribute)."""
    background = colour_features(images)[:, 3:]
    distance = _distance(images, background)
    height, width = distance.shape[1:]
    yy, xx = np.mgrid[0:height, 0:width]
    out = np.empty((len(images), height * width), dtype=np.float32)
    for i, d in enumerate(distance):
        weight = d / (d.sum() + 1e-9)
        cy, cx = int(round(float((weight * yy).sum()))), int(round(float((weight * xx).sum())))
        out[i] = np.roll(d, (height // 2 - cy, width // 2 - cx), axis=(0, 1)).ravel() / (d.max() + 1e-9)
    return out


def _distance(images: np.ndarray, background: np.ndarray) -> np.ndarray:
    return np.sqrt(((images - background[:, :, None, None]) ** 2).sum(1))


@dataclass
class AttributeReader:
    """One kNN classifier per attribute, fitted on decoded renders of known attributes."""

    neighbours: int = 5
    classifiers: dict[str, KNeighborsClassifier] = field(default_factory=dict)
    attributes = ATTRIBUTES  # what `read` returns (memscan.mitigation.scenes.SceneReader has the same interface)

    @staticmethod
    def group_of(wanted: Mapping[str, str]) -> str:
        """The group whose accuracy decides which attributes count: the object's size."""
        return wanted["size"]

    @classmethod
    def calibrated(cls, decode: Decode | None = None, *, n: int = 4000, seed: int = 0) -> AttributeReader:
        """A reader fitted on `n` fresh renders passed through `decode` (identity when None)."""
        images, attrs = decoded_renders(decode, n=n, seed=seed)
        return cls().fit(images, attrs)

    def fit(self, images: np.ndarray, attrs: Sequence[Attributes]) -> AttributeReader:
        colour, shape = colour_features(images), shape_features(images)
        for key in ATTRIBUTES:
            features = colour if key == "colour" else shape
            labels = [getattr(a, key) for a in attrs]
            self.classifiers[key] = KNeighborsClassifier(self.neighbours).fit(features, labels)
        return self

    def read(self, images: np.ndarray) -> list[dict[str, str]]:
        """The attributes each of `images` (N, 3, H, W) in [0, 1] shows."""
        colour, shape = colour_features(images), shape_features(images)
        columns = {k: self.classifiers[k].predict(colour if k == "colour" else shape) for k in ATTRIBUTES}
        return [{k: str(columns[k][i]) for k in ATTRIBUTES} for i in range(len(images))]

    def accuracy(self, images: np.ndarray, attrs: Sequence[Attributes]) -> dict[str, float]:
        """Share of `images` whose attribute the reader gets right, attribute by attribute."""
        read = self.read(images)
        return {k: float(np.mean([r[k] == getattr(a, k) for r, a in zip(read, attrs, strict=True)]))
                for k in ATTRIBUTES}


    def accuracy_by_size(self, images: np.ndarray, attrs: Sequence[Attributes]) -> dict[str, dict[str, float]]:
        """`accuracy` separately for the small and the large objects among `images`."""
        return {size: self.accuracy(images[idx], [attrs[i] for i in idx])
                for size in SIZES if (idx := [i for i, a in enumerate(attrs) if a.size == size])}

    def readable(
        self, images: np.ndarray, attrs: Sequence[Attributes], min_accuracy: float
    ) -> dict[str, tuple[str, ...]]:
        """Per object size, the attributes the reader reads right on at least `min_accuracy` of
        `images` (decoded renders it was not fitted on): the attributes a generation can be checked on."""
        return readable_attributes(self.accuracy_by_size(images, attrs), min_accuracy)


def readable_attributes(by_size: Mapping[str, Mapping[str, float]], min_accuracy: float) -> dict[str, tuple[str, ...]]:
    """Per group (object size; valid-v: scene kind), the attributes whose accuracy in `by_size`
    reaches `min_accuracy`, in the order they are listed there."""
    return {size: tuple(k for k, a in acc.items() if a >= min_accuracy) for size, acc in by_size.items()}


def decoded_renders(decode: Decode | None, *, n: int, seed: int) -> tuple[np.ndarray, list[Attributes]]:
    """`n` random demo images (optionally through `decode`) and their attributes."""
    rng = np.random.default_rng([seed, 7])
    attrs = [sample_attributes(rng) for _ in range(n)]
    images = np.stack([render(a) for a in attrs])
    return (images if decode is None else decode(images)), attrs


def agreement(read: Mapping[str, str], wanted: Mapping[str, str | None], keys: Sequence[str] = ATTRIBUTES) -> float:
    """Share of the wanted attributes among `keys` (those not None) that the image shows."""
    asked = [k for k in keys if wanted.get(k)]
    return float(np.mean([read[k] == wanted[k] for k in asked])) if asked else float("nan")
