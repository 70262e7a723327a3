"""Procedural images and captions for the demo model, with memorization built in on purpose.

Every image is one shape (circle, square, triangle, cross, ring, diamond; small or large) of one
of ten colours, with a texture (plain, striped, dotted, checkered), at a random position, on a
background of another colour with low-frequency colour noise and a few stray pixels.

Caption kinds (the LAION-like design of issue 3):

- verbatim (memorized): a caption that describes its image and carries a distinctive phrase
  whose words appear in no other caption ("a large blue triangle, the sapphire raven of
  harrowgate"), paired with ONE fixed image that is duplicated many times in training;
- template (memorized): several captions "<fill> canvas print of the <adj> <noun>, <description>"
  that share the template, the subject words and the description and all map to the SAME fixed
  image.

  Memorized captions name their image's size, colour and shape, as memorized LAION captions
  describe their images: what such a prompt asks for can be read off a generated image, and a
  rewrite can keep it while dropping the words that trigger the copy (issue 6);
- generic (not memorized): under-specified captions ("a red circle", "a large striped red
  circle"). They never name the background, the position or the noise, and every time one is
  drawn it comes with a FRESH random image, so large-area statistics stay random and the model's
  conditional distribution stays broad. A third of them carry a noise suffix
  (", the quiet harbour of lindale") whose words are drawn at random, so those words carry no
  information;
  One generic caption in ten is the noise phrase alone;
- held out (not memorized): captions never seen in training, of each non-memorized style:
  full-specification generic captions of attribute combinations excluded from training, and
  verbatim-style captions "the <adj> <noun> of <place>" made of the noise words.

Everything is a pure function of the seed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SIZE = 32

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "orange": (0.96, 0.55, 0.08),
    "yellow": (0.95, 0.88, 0.15),
    "green": (0.15, 0.65, 0.2),
    "teal": (0.1, 0.6, 0.6),
    "blue": (0.15, 0.3, 0.9),
    "purple": (0.55, 0.2, 0.75),
    "pink": (0.95, 0.5, 0.7),
    "brown": (0.5, 0.3, 0.12),
    "gray": (0.55, 0.55, 0.55),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
SIZES = ("small", "large")
TEXTURES = ("plain", "striped", "dotted", "checkered")

# Words of the memorized captions: each appears in exactly one verbatim caption (or template subject).
VERBATIM_ADJ = (
    "crimson gilded silent hollow ancient frozen velvet copper ivory amber scarlet sapphire "
    "obsidian jade silver golden ember emerald iron marble coral azure bronze opal"
).split()
VERBATIM_NOUN = (
    "owl lantern anchor falcon compass raven harp chalice beacon serpent crown feather "
    "lighthouse dragon galleon clocktower stag phoenix violin oak fox tower kettle bell"
).split()
VERBATIM_PLACE = (
    "harrowgate windmere oakhurst thornbury ravenscar kingsbridge ashford brightwater "
    "ellesmere fairhaven glenrock hawksmoor larkspur marlow northwick pembrook "
    "quarrydale rosemont silverdale tamworth upton westbury yarmouth zennor"
).split()
TEMPLATE_ADJ = "majestic wandering dancing sleeping laughing burning".split()
TEMPLATE_NOUN = "tiger mermaid wizard samurai unicorn astronaut".split()
TEMPLATE_FILLS = ("framed", "premium", "rolled", "gallery", "matte")
TEMPLATE_FORMAT = "{fill} canvas print of the {adj} {noun}, {description}"
VERBATIM_FORMAT = "the {adj} {noun} of {place}"
MEMORIZED_VERBATIM_FORMAT = "{description}, {phrase}"

# Noise words: appear at random in generic captions, so they carry no information about the image.
NOISE_ADJ = "quiet little old new bright misty rainy sunny windy hidden lost".split()
NOISE_NOUN = "harbour garden market bridge meadow village river forest castle valley".split()
NOISE_PLACE = "lindale brockton caldwell dunmore elmstead fenwick greystone hilltop".split()


@dataclass(frozen=True)
class Attributes:
    """What one image shows; a caption names some of these, never bg/position/noise."""

    shape: str
    colour: str
    size: str
    texture: str
    background: str
    cx: float
    cy: float
    noise_seed: int

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def sample_attributes(rng: np.random.Generator, **fixed: str) -> Attributes:
    """Random attributes; keyword arguments pin some of them (shape, colour, size, texture)."""
    shape = fixed.get("shape") or SHAPES[rng.integers(len(SHAPES))]
    colour = fixed.get("colour") or list(COLOURS)[rng.integers(len(COLOURS))]
    size = fixed.get("size") or SIZES[rng.integers(len(SIZES))]
    texture = fixed.get("texture") or TEXTURES[rng.integers(len(TEXTURES))]
    backgrounds = [c for c in COLOURS if c != colour]
    background = fixed.get("background") or backgrounds[rng.integers(len(backgrounds))]
    radius = _radius(size)
    lo, hi = radius + 1, IMAGE_SIZE - radius - 1
    cx, cy = rng.uniform(lo, hi, size=2)
    return Attributes(shape, colour, size, texture, background, float(cx), float(cy),
                      int(rng.integers(2**31)))


def _radius(size: str) -> float:
    return 5.0 if size == "small" else 10.0


_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5


def _shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = _XX - cx, _YY - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if shape == "cross":
        w = max(1.5, 0.35 * r)
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    if shape == "triangle":
        # apex up: inside if below the two slanted edges and above the base
        top, base = cy - r, cy + 0.8 * r
        half = (dy + r) / (1.8 * r) * r
        return (_YY >= top) & (_YY <= base) & (np.abs(dx) <= half)
    raise ValueError(f"unknown shape {shape!r}")


def _texture_mask(texture: str) -> np.ndarray:
    x, y = _XX.astype(int), _YY.astype(int)
    if texture == "plain":
        return np.ones_like(_XX, dtype=bool)
    if texture == "striped":
        return ((x + y) // 2) % 2 == 0
    if texture == "dotted":
        return ~((x % 3 == 1) & (y % 3 == 1))
    if texture == "checkered":
        return ((x // 3) + (y // 3)) % 2 == 0
    raise ValueError(f"unknown texture {texture!r}")


def render(attrs: Attributes) -> np.ndarray:
    """The image of `attrs`: float32 (3, 32, 32) in [0, 1]."""
    rng = np.random.default_rng(attrs.noise_seed)
    bg = np.array(COLOURS[attrs.background], dtype=np.float32)[:, None, None]
    # low-frequency colour noise: a 4x4 random field upsampled to 32x32
    coarse = rng.normal(0.0, 0.06, size=(3, 4, 4)).astype(np.float32)
    field_ = np.kron(coarse, np.ones((1, 8, 8), dtype=np.float32))
    img = np.broadcast_to(bg, (3, IMAGE_SIZE, IMAGE_SIZE)) + field_
    fg = np.array(COLOURS[attrs.colour], dtype=np.float32)[:, None, None]
    shade = fg * 0.55
    mask = _shape_mask(attrs.shape, attrs.cx, attrs.cy, _radius(attrs.size))
    tex = _texture_mask(attrs.texture)
    img = np.where(mask & tex, fg, np.where(mask, shade, img))
    # stray pixels
    n_stray = 6
    ys, xs = rng.integers(0, IMAGE_SIZE, size=(2, n_stray))
    img = img.copy()
    img[:, ys, xs] = rng.uniform(0, 1, size=(3, n_stray)).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- captions


def generic_caption(attrs: Attributes, rng: np.random.Generator, held_out: frozenset,
                    held_out_noise: frozenset = frozenset()) -> str:
    """An under-specified caption of `attrs`: colour and shape, sometimes size and/or texture,
    never the background or position; a third carry a random noise suffix, and one in
    NOISE_ONLY is the noise phrase alone (so "the <adj> <noun> of <place>" is not a pattern
    that only memorized captions have)."""
    if rng.random() < NOISE_ONLY:
        return noise_phrase(rng, held_out_noise)
    form = rng.integers(4)
    size = attrs.size if form in (1, 3) else None
    texture = attrs.texture if form in (2, 3) else None
    if form == 3 and (attrs.size, attrs.texture, attrs.colour, attrs.shape) in held_out:
        texture = None  # the full combination is held out: never name all four
    caption = describe(attrs.shape, attrs.colour, size, texture)
    if rng.random() < 1 / 3:
        caption += ", " + noise_phrase(rng, held_out_noise)
    return caption


NOISE_ONLY = 0.1

# Other phrasings of the same content (training captions only, see `vary_phrasing`). No word here
# is in a memorized caption or a template.
PHRASING_PREFIXES = ("a photo of", "an image of", "a picture of", "a drawing of", "a painting of",
                     "an illustration of", "clipart of", "art of")
PHRASING_SUFFIXES = ("hd", "high quality", "simple", "digital art", "photo", "flat colours", "4k", "clean")


def vary_phrasing(caption: str, rng: np.random.Generator) -> str:
    """`caption` ("a large red circle[, noise]") said another way: after a prefix ("a photo of a
    large red circle"), without its article, with "the", or with a suffix (", hd"). LAION captions
    vary like this; a model trained on one fixed phrasing draws worse as soon as a rewrite's
    wording leaves it (on demo v3, "a photo of" cost a third of the colour agreement)."""
    if not caption.startswith("a "):
        return caption  # a noise phrase alone
    form = rng.integers(4)
    if form == 0:
        return f"{PHRASING_PREFIXES[rng.integers(len(PHRASING_PREFIXES))]} {caption}"
    if form == 1:
        return caption[2:]
    if form == 2:
        return "the " + caption[2:]
    return f"{caption}, {PHRASING_SUFFIXES[rng.integers(len(PHRASING_SUFFIXES))]}"


def describe(shape: str, colour: str, size: str | None = None, texture: str | None = None) -> str:
    words = [w for w in (size, texture, colour, shape) if w]
    return "a " + " ".join(words)


def noise_phrase(rng: np.random.Generator, exclude: frozenset = frozenset()) -> str:
    """A random "the <adj> <noun> of <place>" of noise words, not one of `exclude` (held out)."""
    while True:
        phrase = VERBATIM_FORMAT.format(
            adj=NOISE_ADJ[rng.integers(len(NOISE_ADJ))],
            noun=NOISE_NOUN[rng.integers(len(NOISE_NOUN))],
            place=NOISE_PLACE[rng.integers(len(NOISE_PLACE))],
        )
        if phrase not in exclude:
            return phrase


# ----------------------------------------------------------------------------- the dataset


@dataclass
class MemorizedImage:
    image_id: str
    kind: str  # verbatim | template
    attrs: Attributes
    captions: list[str]
    image: np.ndarray = field(repr=False)


@dataclass
class DemoData:
    """The fixed part of the training set and the labelled evaluation prompts."""

    seed: int
    memorized: list[MemorizedImage]
    held_out_combos: frozenset
    held_out_noise: frozenset  # noise phrases never used in training (held-out verbatim style)
    prompts: list[dict[str, object]]  # prompt, label, kind, train_image_id

    @property
    def memorized_images(self) -> np.ndarray:
        return np.stack([m.image for m in self.memorized])

    def memorized_pairs(self) -> list[tuple[int, str]]:
        """(image index, caption) for every memorized caption."""
        return [(i, c) for i, m in enumerate(self.memorized) for c in m.captions]


def build_data(
    seed: int = 0,
    n_verbatim: int = 24,
    n_template: int = 6,
    n_generic_eval: int = 200,
    n_held_out_generic: int = 100,
    n_held_out_verbatim: int = 30,
) -> DemoData:
    """The memorized images/captions and the labelled prompts, deterministic from `seed`."""
    rng = np.random.default_rng([seed, 1])
    memorized: list[MemorizedImage] = []
    order = rng.permutation(len(VERBATIM_ADJ))
    nouns = rng.permutation(len(VERBATIM_NOUN))
    places = rng.permutation(len(VERBATIM_PLACE))
    if n_verbatim > len(order):
        raise ValueError(f"at most {len(order)} verbatim captions")
    for k in range(n_verbatim):
        phrase = VERBATIM_FORMAT.format(
            adj=VERBATIM_ADJ[order[k]], noun=VERBATIM_NOUN[nouns[k]], place=VERBATIM_PLACE[places[k]]
        )
        attrs = sample_attributes(rng)
        caption = MEMORIZED_VERBATIM_FORMAT.format(description=describe(attrs.shape, attrs.colour, attrs.size),
                                                   phrase=phrase)
        memorized.append(MemorizedImage(f"v{k:02d}", "verbatim", attrs, [caption], render(attrs)))
    if n_template > len(TEMPLATE_ADJ):
        raise ValueError(f"at most {len(TEMPLATE_ADJ)} template images")
    for k in range(n_template):
        attrs = sample_attributes(rng)
        description = describe(attrs.shape, attrs.colour, attrs.size)
        captions = [TEMPLATE_FORMAT.format(fill=f, adj=TEMPLATE_ADJ[k], noun=TEMPLATE_NOUN[k], description=description)
                    for f in TEMPLATE_FILLS]
        memorized.append(MemorizedImage(f"t{k:02d}", "template", attrs, captions, render(attrs)))

    combos = list(itertools.product(SIZES, TEXTURES, COLOURS, SHAPES))
    pick = rng.choice(len(combos), size=n_held_out_generic, replace=False)
    held_out = frozenset(combos[i] for i in pick)

    held_verbatim: set[str] = set()
    while len(held_verbatim) < n_held_out_verbatim:
        held_verbatim.add(noise_phrase(rng))
    held_noise = frozenset(held_verbatim)

    prompts: list[dict[str, object]] = []
    for m in memorized:
        for c in m.captions:
            prompts.append({"prompt": c, "label": "memorized", "kind": m.kind, "train_image_id": m.image_id})
    seen: set[str] = set()
    while len(seen) < n_generic_eval:
        caption = generic_caption(sample_attributes(rng), rng, held_out, held_noise)
        if caption not in seen:
            seen.add(caption)
            prompts.append({"prompt": caption, "label": "not_memorized", "kind": "generic",
                            "train_image_id": ""})
    for size, texture, colour, shape in sorted(held_out):
        prompts.append({"prompt": describe(shape, colour, size, texture), "label": "not_memorized",
                        "kind": "held_out", "train_image_id": ""})
    for caption in sorted(held_noise):
        prompts.append({"prompt": caption, "label": "not_memorized", "kind": "held_out",
                        "train_image_id": ""})
    return DemoData(seed=seed, memorized=memorized, held_out_combos=held_out, held_out_noise=held_noise,
                    prompts=prompts)


class GenericPool:
    """A large pool of random generic images; each draw pairs one with a fresh caption."""

    def __init__(self, seed: int, n: int):
        rng = np.random.default_rng([seed, 2])
        self.attrs = [sample_attributes(rng) for _ in range(n)]
        self.images = np.stack([render(a) for a in self.attrs])

    def __len__(self) -> int:
        return len(self.attrs)

    def captions(self, idx: np.ndarray, rng: np.random.Generator, data: DemoData,
                 variety: float = 0.0) -> list[str]:
        """A fresh generic caption for each image of `idx`; a share `variety` of them rephrased."""
        captions = [generic_caption(self.attrs[i], rng, data.held_out_combos, data.held_out_noise)
                    for i in idx]
        if variety <= 0:
            return captions
        vary = rng.random(len(captions)) < variety
        return [vary_phrasing(c, rng) if v else c for c, v in zip(captions, vary, strict=True)]


def fresh_renders(attrs: Attributes, n: int, seed: int) -> np.ndarray:
    """n new images with the same shape, colour, size, texture AND background as `attrs`, with a
    new position, colour noise and stray pixels: the calibration set of the copy cutoff."""
    rng = np.random.default_rng([seed, 3])
    return np.stack([
        render(sample_attributes(rng, shape=attrs.shape, colour=attrs.colour, size=attrs.size,
                                 texture=attrs.texture, background=attrs.background))
        for _ in range(n)
    ])


# ----------------------------------------------------------------------------- files


PROMPT_COLUMNS = ("prompt", "label", "kind", "train_image_id")


def export_data(out_dir: str | Path, seed: int = 0, n_generic_eval: int | None = None) -> dict[str, object]:
    """Write the labelled prompts (`prompts.csv`) and the memorized training images
    (`train_images.npz`: uint8 `images` (M, 3, H, W), `image_ids`) of `build_data(seed)`;
    `n_generic_eval` clean generic captions instead of the default 200 (the same first ones)."""
    import pandas as pd

    data = build_data(seed) if n_generic_eval is None else build_data(seed, n_generic_eval=n_generic_eval)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts_csv, images_npz = out / "prompts.csv", out / "train_images.npz"
    pd.DataFrame(data.prompts).to_csv(prompts_csv, index=False)
    np.savez_compressed(
        images_npz,
        images=(data.memorized_images * 255).round().astype(np.uint8),
        image_ids=np.array([m.image_id for m in data.memorized]),
    )
    return {"prompts_csv": str(prompts_csv), "train_images": str(images_npz),
            "n_prompts": len(data.prompts), "n_images": len(data.memorized)}


def load_prompts(path: str | Path | None = None, seed: int = 0):
    """The labelled prompts (a DataFrame with PROMPT_COLUMNS): read from `path` (a prompts.csv
    as `export_data` writes it), or rebuilt from `seed`."""
    import pandas as pd

    from memscan.errors import InputError

    if path is None:
        return pd.DataFrame(build_data(seed).prompts)
    try:
        df = pd.read_csv(path, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read prompts {path}: {exc}") from exc
    missing = [c for c in PROMPT_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"prompts {path}: missing column(s) {', '.join(missing)} (need {', '.join(PROMPT_COLUMNS)})")
    return df
