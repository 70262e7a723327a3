"""The `valid-v` design: a second test model's images and captions, built unlike the demo's.

memscan was tuned on the demo (coloured shapes on a background, epsilon-prediction). This
world exists only to VALIDATE on a differently built model (issue 12, item 3); nothing of
memscan's detection is tuned on it. It differs from the demo in every part a user's model could:

- images: procedural scenes that fill the frame, not one object on a background: stripes
  (horizontal, vertical, diagonal, each tilted a little at random), concentric rings, a grid of
  lines, a horizon (a night / dawn / noon / dusk sky over hills or a sea) and object-like glyphs
  (star, moon, heart, arrow) on a plain ground, in 8 colours of their own (scarlet ... white);
- captions: other words and templates. A description names the scene and its colours
  ("diagonal lemon and navy stripes", "a night sky over lime hills", "a white star on violet");
  many pin most of the image (a night sky is half the frame), which makes their guidance large;
- memorized, verbatim: "<description> by <first> <last>", a name whose words no other caption
  uses, ONE fixed image each; memorized, template: "<fill> <subject> wallpaper pack - <description>"
  (4 fills), all mapping to one fixed image;
- generic (not memorized): under-specified descriptions of a fresh random image each time they are
  drawn; a third carry a noise attribution " by <first> <last>" from a pool of common names, and
  one in ten is such an attribution alone, so "by <name>" is no pattern of memorized captions only;
- held out (not memorized): full descriptions whose combination never appears in a training
  caption, and "<description> by <name>" with names never used in training.

What a caption names can be read off a render by `read_attributes`, a rule-based reader (colours
by nearest palette entry, the scene kind and orientation from the structure of the colour map);
what no caption names (stripe width and phase, tilt, ring centre, grid spacing, horizon height,
glyph size and position, stars, colour noise) is random, so the copy cutoff of
`memscan.demo.verify` (fresh renders that share everything a caption can say) stays meaningful.

Same interface as `memscan.demo.data` (`build_data`, `GenericPool`, `fresh_renders`,
`export_data`, `load_prompts`), so `memscan.demo.train.train_demo` and `memscan.demo.verify` run
it with `design="valid-v"`. Everything is a pure function of the seed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memscan.demo.data import PROMPT_COLUMNS, DemoData, MemorizedImage

NAME = "valid-v"
IMAGE_SIZE = 32

PALETTE: dict[str, tuple[float, float, float]] = {
    "scarlet": (0.85, 0.1, 0.15),
    "tangerine": (0.98, 0.55, 0.1),
    "lemon": (0.97, 0.92, 0.3),
    "lime": (0.5, 0.85, 0.2),
    "aqua": (0.25, 0.8, 0.85),
    "navy": (0.1, 0.15, 0.5),
    "violet": (0.6, 0.3, 0.85),
    "white": (0.95, 0.95, 0.95),
}
SKIES: dict[str, tuple[float, float, float]] = {
    "night": (0.02, 0.03, 0.1),
    "dawn": (0.98, 0.7, 0.7),
    "noon": (0.55, 0.75, 0.98),
    "dusk": (0.4, 0.15, 0.4),
}
KINDS = ("stripes", "rings", "grid", "horizon", "glyph")
ORIENTATIONS = ("horizontal", "vertical", "diagonal")
TERRAINS = ("hills", "sea")
GLYPHS = ("star", "moon", "heart", "arrow")

# Names of the memorized verbatim captions: each word in exactly one caption.
VERBATIM_FIRST = (
    "odalys bertil ximena cosimo thandiwe anselm ludmila evander perpetua casimir leocadia "
    "ignatius zephyrine barnaby octavia florian seraphina hieronymus wilhelmina cornelius"
).split()
VERBATIM_LAST = (
    "ashgrove blackwood carrow delacroix everly fairweather grimsby holloway ingleby jessop "
    "kilbride lockhart merriweather nightingale ormsby pendragon quill rutherford sallow thistlewood"
).split()
TEMPLATE_SUBJECTS = ("solstice", "mirage", "lullaby", "cascade", "odyssey")
TEMPLATE_FILLS = ("free", "download", "official", "new")
TEMPLATE_FORMAT = "{fill} {subject} wallpaper pack - {description}"
VERBATIM_FORMAT = "{description} by {name}"
# Noise names: drawn at random for generic captions, so they say nothing about the image.
NOISE_FIRST = "anna mark lucy tom nina paul emma omar rosa ivan".split()
NOISE_LAST = "berg cole dunn frey hale kerr lowe moss pike wolfe".split()
NOISE_SUFFIX = 1 / 3
NOISE_ONLY = 0.1
# Other phrasings of generic training captions (no word here is in a memorized caption).
PHRASING_PREFIXES = ("an abstract image of", "a texture of", "a poster of", "a render of", "a design with")
PHRASING_SUFFIXES = ("minimal", "retro", "vector art", "flat design", "8k", "soft light")


@dataclass(frozen=True)
class Scene:
    """What one image shows. `key()` is what a full description names; the rest is never named."""

    kind: str
    colour: str  # stripes/rings: first colour (palette order); grid: lines; horizon: ground; glyph: the glyph
    ground: str = ""  # stripes/rings: second colour; grid and glyph: background; horizon: ""
    orientation: str = ""  # stripes
    sky: str = ""  # horizon
    terrain: str = ""  # horizon
    glyph: str = ""  # glyph
    # never named
    width: float = 0.0  # stripe / ring width, grid spacing, glyph radius, hill amplitude
    phase: float = 0.0
    tilt: float = 0.0  # stripes: degrees; hills: wave period
    cx: float = 0.0  # ring centre / glyph centre
    cy: float = 0.0  # ... / horizon height
    noise_seed: int = 0

    def key(self) -> tuple[str, ...]:
        """The attributes a full description names."""
        return (self.kind, self.colour, self.ground, self.orientation, self.sky, self.terrain, self.glyph)

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def all_keys() -> list[tuple[str, ...]]:
    """Every describable combination (`Scene.key()`), in a fixed order."""
    names = list(PALETTE)
    pairs = list(itertools.combinations(names, 2))
    ordered = list(itertools.permutations(names, 2))
    keys: list[tuple[str, ...]] = []
    keys += [("stripes", a, b, o, "", "", "") for o in ORIENTATIONS for a, b in pairs]
    keys += [("rings", a, b, "", "", "", "") for a, b in pairs]
    keys += [("grid", a, b, "", "", "", "") for a, b in ordered]
    keys += [("horizon", c, "", "", s, t, "") for s in SKIES for t in TERRAINS for c in names]
    keys += [("glyph", a, b, "", "", "", g) for g in GLYPHS for a, b in ordered]
    return keys


def sample_scene(rng: np.random.Generator, key: tuple[str, ...] | None = None) -> Scene:
    """A random scene; `key` pins the named attributes (then only the unnamed ones are drawn)."""
    if key is None:
        kind = KINDS[rng.integers(len(KINDS))]
        names = list(PALETTE)
        a, b = (names[i] for i in rng.choice(len(names), size=2, replace=False))
        if kind in ("stripes", "rings") and names.index(a) > names.index(b):
            a, b = b, a
        key = {
            "stripes": (kind, a, b, ORIENTATIONS[rng.integers(3)], "", "", ""),
            "rings": (kind, a, b, "", "", "", ""),
            "grid": (kind, a, b, "", "", "", ""),
            "horizon": (kind, a, "", "", list(SKIES)[rng.integers(4)], TERRAINS[rng.integers(2)], ""),
            "glyph": (kind, a, b, "", "", "", GLYPHS[rng.integers(len(GLYPHS))]),
        }[kind]
    kind = key[0]
    u = rng.uniform(size=5)
    if kind == "stripes":
        width, phase, tilt, cx, cy = 3.0 + 3.0 * u[0], 10.0 * u[1], -8.0 + 16.0 * u[2], 0.0, 0.0
    elif kind == "rings":
        width, phase, tilt, cx, cy = 2.5 + 2.0 * u[0], 10.0 * u[1], 0.0, 4 + 24 * u[2], 4 + 24 * u[3]
    elif kind == "grid":
        width, phase, tilt, cx, cy = 6.0 + 3.0 * u[0], 10.0 * u[1], 10.0 * u[2], 0.0, 0.0
    elif kind == "horizon":
        width, phase, tilt, cx, cy = 1.5 + 2.0 * u[0], 2 * np.pi * u[1], 10.0 + 14.0 * u[2], 0.0, 13 + 7 * u[3]
    else:  # glyph
        r = 7.0 + 4.0 * u[0]
        width, phase, tilt, cx, cy = r, 0.0, 0.0, r + 1 + (30 - 2 * r) * u[1], r + 1 + (30 - 2 * r) * u[2]
    return Scene(*key, width=float(width), phase=float(phase), tilt=float(tilt), cx=float(cx), cy=float(cy),
                 noise_seed=int(rng.integers(2**31)))


_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5


def glyph_mask(glyph: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Where glyph `glyph` of radius `r` centred at (cx, cy) covers the image."""
    dx, dy = (_XX - cx) / r, (_YY - cy) / r
    if glyph == "star":
        theta = np.arctan2(dy, dx) + np.pi / 2
        reach = 0.42 + 0.58 * ((np.cos(5 * theta) + 1) / 2) ** 2
        return np.hypot(dx, dy) <= reach
    if glyph == "moon":
        return (np.hypot(dx, dy) <= 1.0) & (np.hypot(dx - 0.45, dy + 0.1) > 0.8)
    if glyph == "heart":
        x, y = dx * 1.25, -(dy * 1.25 - 0.15)
        return (x**2 + y**2 - 1) ** 3 - x**2 * y**3 <= 0
    if glyph == "arrow":
        shaft = (dx >= -1.0) & (dx <= 0.1) & (np.abs(dy) <= 0.25)
        head = (dx >= 0.0) & (dx <= 1.0) & (np.abs(dy) <= 0.9 * (1.0 - dx))
        return shaft | head
    raise ValueError(f"unknown glyph {glyph!r}")


def _label_map(s: Scene) -> tuple[np.ndarray, list[tuple[float, float, float]]]:
    """Per pixel, an index into the returned list of colours."""
    if s.kind == "stripes":
        normal = {"horizontal": 90.0, "vertical": 0.0, "diagonal": 45.0}[s.orientation] + s.tilt
        a = np.deg2rad(normal)
        u = _XX * np.cos(a) + _YY * np.sin(a)
        lab = (np.floor((u + s.phase) / s.width) % 2).astype(int)
        return lab, [PALETTE[s.colour], PALETTE[s.ground]]
    if s.kind == "rings":
        d = np.hypot(_XX - s.cx, _YY - s.cy)
        lab = (np.floor((d + s.phase) / s.width) % 2).astype(int)
        return lab, [PALETTE[s.colour], PALETTE[s.ground]]
    if s.kind == "grid":
        on = (np.mod(_XX - s.phase, s.width) < 2.0) | (np.mod(_YY - s.tilt, s.width) < 2.0)
        return np.where(on, 0, 1), [PALETTE[s.colour], PALETTE[s.ground]]
    if s.kind == "horizon":
        edge = np.full_like(_XX, s.cy)
        if s.terrain == "hills":
            edge = s.cy + s.width * np.sin(2 * np.pi * _XX / s.tilt + s.phase)
        lab = np.where(_YY >= edge, 1, 0)
        return lab, [SKIES[s.sky], PALETTE[s.colour]]
    if s.kind == "glyph":
        mask = glyph_mask(s.glyph, s.cx, s.cy, s.width)
        return np.where(mask, 0, 1), [PALETTE[s.colour], PALETTE[s.ground]]
    raise ValueError(f"unknown kind {s.kind!r}")


def render(s: Scene) -> np.ndarray:
    """The image of `s`: float32 (3, 32, 32) in [0, 1]."""
    rng = np.random.default_rng(s.noise_seed)
    lab, colours = _label_map(s)
    img = np.asarray(colours, dtype=np.float32)[lab].transpose(2, 0, 1)
    coarse = rng.normal(0.0, 0.04, size=(3, 4, 4)).astype(np.float32)  # low-frequency colour noise
    img = img + np.kron(coarse, np.ones((1, 8, 8), dtype=np.float32))
    img = img + rng.normal(0.0, 0.015, size=img.shape).astype(np.float32)  # grain
    if s.kind == "horizon" and s.sky == "night":  # stars
        n = 12
        ys = rng.integers(0, max(2, int(s.cy) - 3), size=n)
        xs = rng.integers(0, IMAGE_SIZE, size=n)
        img[:, ys, xs] = 0.9
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- reading


_PROTO_NAMES = [*PALETTE, *(f"sky:{k}" for k in SKIES)]
_PROTOS = np.array([*PALETTE.values(), *SKIES.values()], dtype=np.float32)


def _quantize(img: np.ndarray) -> np.ndarray:
    """Per pixel, the index of the nearest palette or sky colour."""
    d = ((img.transpose(1, 2, 0)[:, :, None, :] - _PROTOS[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def _glyph_templates(size: int = 16) -> dict[str, np.ndarray]:
    return {g: _crop_resize(glyph_mask(g, 16.0, 16.0, 12.0), size) for g in GLYPHS}


def _crop_resize(mask: np.ndarray, size: int = 16) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return np.zeros((size, size), bool)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    iy = (np.arange(size) * crop.shape[0] / size).astype(int)
    ix = (np.arange(size) * crop.shape[1] / size).astype(int)
    return crop[iy][:, ix]


def read_attributes(img: np.ndarray) -> dict[str, str]:
    """What a description would say about `img` (3, H, W) in [0, 1]: kind and the named
    attributes (`Scene.key()`'s fields), read by rules: colours by the nearest palette or sky
    colour, the kind and orientation from the structure of the colour map."""
    q = _quantize(img)
    n_pal = len(PALETTE)
    names = list(PALETTE)
    top = q[:6]
    if (top >= n_pal).mean() > 0.6:  # a sky over the top rows: a horizon
        sky_idx = np.bincount(top[top >= n_pal].ravel(), minlength=len(_PROTOS))
        sky = _PROTO_NAMES[int(sky_idx.argmax())].split(":", 1)[1]
        bottom = q[-6:]
        ground = names[int(np.bincount(bottom[bottom < n_pal].ravel(), minlength=n_pal).argmax())]
        is_sky = q >= n_pal
        # per column, the row below the lowest sky pixel (a night sky's white stars lie above it)
        rows = np.arange(q.shape[0])[:, None]
        edge = np.where(is_sky, rows, -1).max(axis=0) + 1
        terrain = "hills" if edge.std() > 0.8 else "sea"
        return {"kind": "horizon", "colour": ground, "ground": "", "orientation": "", "sky": sky,
                "terrain": terrain, "glyph": ""}
    counts = np.bincount(q.ravel(), minlength=len(_PROTOS))[:n_pal]
    first, second = (int(i) for i in np.argsort(counts)[::-1][:2])
    two = np.where(q == first, 0, 1)  # 0 = the majority colour
    minority = counts[second] / max(1, counts[first] + counts[second])
    if minority < 0.3:  # one object on a ground
        mask = q == second
        crop = _crop_resize(mask)
        ious = {g: (crop & t).sum() / max(1, (crop | t).sum()) for g, t in _glyph_templates().items()}
        return {"kind": "glyph", "colour": names[second], "ground": names[first], "orientation": "", "sky": "",
                "terrain": "", "glyph": max(ious, key=ious.get)}
    # disagreement of neighbours in four directions
    e_h = (two[:, 1:] != two[:, :-1]).mean()
    e_v = (two[1:, :] != two[:-1, :]).mean()
    e_d = (two[1:, :-1] != two[:-1, 1:]).mean()  # along x + y = const
    e_a = (two[1:, 1:] != two[:-1, :-1]).mean()
    for line in (first, second):
        rows = sum((q[y] == line).mean() > 0.85 for y in range(q.shape[0]))
        cols = sum((q[:, x] == line).mean() > 0.85 for x in range(q.shape[1]))
        if rows >= 2 and cols >= 2:
            other = second if line == first else first
            return {"kind": "grid", "colour": names[line], "ground": names[other], "orientation": "",
                    "sky": "", "terrain": "", "glyph": ""}
    a, b = sorted((first, second))
    es = {"horizontal": e_h, "vertical": e_v, "diagonal": min(e_d, e_a)}
    best = min(es, key=es.get)
    if es[best] < 0.45 * max(e_h, e_v):
        return {"kind": "stripes", "colour": names[a], "ground": names[b], "orientation": best, "sky": "",
                "terrain": "", "glyph": ""}
    return {"kind": "rings", "colour": names[a], "ground": names[b], "orientation": "", "sky": "",
            "terrain": "", "glyph": ""}


def read_key(img: np.ndarray) -> tuple[str, ...]:
    """`read_attributes` as a `Scene.key()` tuple."""
    r = read_attributes(img)
    return tuple(r[f] for f in ("kind", "colour", "ground", "orientation", "sky", "terrain", "glyph"))


# ----------------------------------------------------------------------------- captions


def _a(word: str) -> str:
    """`word` with its indefinite article."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def describe(key: tuple[str, ...], form: str = "full") -> str:
    """A description of `key`: "full" names every attribute; other forms leave some out."""
    kind, colour, ground, orientation, sky, terrain, glyph = key
    if kind == "stripes":
        return {"full": f"{orientation} {colour} and {ground} stripes", "colours": f"{colour} and {ground} stripes",
                "shape": f"{orientation} stripes"}[form]
    if kind == "rings":
        return {"full": f"{colour} and {ground} rings", "colours": f"{colour} rings", "shape": "concentric rings"}[form]
    if kind == "grid":
        return {"full": f"{_a(colour)} grid on {ground}", "colours": f"{_a(colour)} grid",
                "shape": f"a grid on {ground}"}[form]
    if kind == "horizon":
        land = f"{colour} hills" if terrain == "hills" else f"{_a(colour)} sea"
        return {"full": f"a {sky} sky over {land}", "colours": land,
                "shape": f"a {sky} sky over {'hills' if terrain == 'hills' else 'the sea'}"}[form]
    if kind == "glyph":
        return {"full": f"{_a(colour)} {glyph} on {ground}", "colours": f"{_a(colour)} {glyph}",
                "shape": f"{_a(glyph)} on {ground}"}[form]
    raise ValueError(f"unknown kind {kind!r}")


FORMS = ("full", "colours", "shape")


def noise_name(rng: np.random.Generator, exclude: frozenset = frozenset()) -> str:
    """A random common "<first> <last>" not in `exclude` (the held-out names)."""
    while True:
        name = f"{NOISE_FIRST[rng.integers(len(NOISE_FIRST))]} {NOISE_LAST[rng.integers(len(NOISE_LAST))]}"
        if name not in exclude:
            return name


def generic_caption(scene: Scene, rng: np.random.Generator, held_out: frozenset,
                    held_out_names: frozenset = frozenset()) -> str:
    """An under-specified caption of `scene` (a held-out combination is never named in full); a
    third carry " by <noise name>", one in NOISE_ONLY is "by <noise name>" alone."""
    if rng.random() < NOISE_ONLY:
        return "by " + noise_name(rng, held_out_names)
    form = FORMS[rng.integers(len(FORMS))]
    if form == "full" and scene.key() in held_out:
        form = "colours"
    caption = describe(scene.key(), form)
    if rng.random() < NOISE_SUFFIX:
        caption = VERBATIM_FORMAT.format(description=caption, name=noise_name(rng, held_out_names))
    return caption


def vary_phrasing(caption: str, rng: np.random.Generator) -> str:
    """`caption` said another way: after a prefix, without its article, or with a suffix."""
    if caption.startswith("by "):
        return caption
    form = rng.integers(3)
    if form == 0:
        return f"{PHRASING_PREFIXES[rng.integers(len(PHRASING_PREFIXES))]} {caption}"
    if form == 1 and caption.startswith(("a ", "an ")):
        return caption.split(" ", 1)[1]
    return f"{caption}, {PHRASING_SUFFIXES[rng.integers(len(PHRASING_SUFFIXES))]}"


# ----------------------------------------------------------------------------- the dataset


def build_data(
    seed: int = 0,
    n_verbatim: int = 20,
    n_template: int = 5,
    n_generic_eval: int = 200,
    n_held_out_generic: int = 80,
    n_held_out_verbatim: int = 40,
) -> DemoData:
    """The memorized images/captions and the labelled prompts, deterministic from `seed`."""
    if n_verbatim > len(VERBATIM_FIRST):
        raise ValueError(f"at most {len(VERBATIM_FIRST)} verbatim captions")
    if n_template > len(TEMPLATE_SUBJECTS):
        raise ValueError(f"at most {len(TEMPLATE_SUBJECTS)} template images")
    rng = np.random.default_rng([seed, 101])
    keys = all_keys()
    # memorized images: distinct combinations, every kind in turn
    by_kind = {k: [key for key in keys if key[0] == k] for k in KINDS}
    used: set[tuple[str, ...]] = set()

    def fresh_key(i: int) -> tuple[str, ...]:
        pool = [k for k in by_kind[KINDS[i % len(KINDS)]] if k not in used]
        key = pool[rng.integers(len(pool))]
        used.add(key)
        return key

    first, last = rng.permutation(len(VERBATIM_FIRST)), rng.permutation(len(VERBATIM_LAST))
    memorized: list[MemorizedImage] = []
    for k in range(n_verbatim):
        scene = sample_scene(rng, fresh_key(k))
        name = f"{VERBATIM_FIRST[first[k]]} {VERBATIM_LAST[last[k]]}"
        caption = VERBATIM_FORMAT.format(description=describe(scene.key()), name=name)
        memorized.append(MemorizedImage(f"v{k:02d}", "verbatim", scene, [caption], render(scene)))
    for k in range(n_template):
        scene = sample_scene(rng, fresh_key(n_verbatim + k))
        captions = [TEMPLATE_FORMAT.format(fill=f, subject=TEMPLATE_SUBJECTS[k], description=describe(scene.key()))
                    for f in TEMPLATE_FILLS]
        memorized.append(MemorizedImage(f"t{k:02d}", "template", scene, captions, render(scene)))

    free = [k for k in keys if k not in used]
    held_out = frozenset(free[i] for i in rng.choice(len(free), size=n_held_out_generic, replace=False))
    names = [f"{a} {b}" for a in NOISE_FIRST for b in NOISE_LAST]
    held_names = frozenset(names[i] for i in rng.choice(len(names), size=n_held_out_verbatim, replace=False))

    prompts: list[dict[str, object]] = []
    for m in memorized:
        for c in m.captions:
            prompts.append({"prompt": c, "label": "memorized", "kind": m.kind, "train_image_id": m.image_id})
    seen: set[str] = set()
    while len(seen) < n_generic_eval:
        caption = generic_caption(sample_scene(rng), rng, held_out, held_names)
        if caption not in seen:
            seen.add(caption)
            prompts.append({"prompt": caption, "label": "not_memorized", "kind": "generic", "train_image_id": ""})
    for key in sorted(held_out):
        prompts.append({"prompt": describe(key), "label": "not_memorized", "kind": "held_out", "train_image_id": ""})
    trained = [k for k in free if k not in held_out]
    for name in sorted(held_names):
        key = trained[rng.integers(len(trained))]
        prompts.append({"prompt": VERBATIM_FORMAT.format(description=describe(key), name=name),
                        "label": "not_memorized", "kind": "held_out", "train_image_id": ""})
    return DemoData(seed=seed, memorized=memorized, held_out_combos=held_out, held_out_noise=held_names,
                    prompts=prompts)


class GenericPool:
    """A large pool of random scenes; each draw pairs one with a fresh caption."""

    def __init__(self, seed: int, n: int):
        rng = np.random.default_rng([seed, 102])
        self.attrs = [sample_scene(rng) for _ in range(n)]
        self.images = np.stack([render(a) for a in self.attrs]) if n else np.zeros((0, 3, IMAGE_SIZE, IMAGE_SIZE),
                                                                                       np.float32)

    def __len__(self) -> int:
        return len(self.attrs)

    def captions(self, idx: np.ndarray, rng: np.random.Generator, data: DemoData,
                 variety: float = 0.0) -> list[str]:
        """A fresh generic caption for each scene of `idx`; a share `variety` of them rephrased."""
        captions = [generic_caption(self.attrs[i], rng, data.held_out_combos, data.held_out_noise) for i in idx]
        if variety <= 0:
            return captions
        vary = rng.random(len(captions)) < variety
        return [vary_phrasing(c, rng) if v else c for c, v in zip(captions, vary, strict=True)]


def fresh_renders(scene: Scene, n: int, seed: int) -> np.ndarray:
    """n new images that share everything a caption can say about `scene` (`Scene.key()`), with
    new unnamed attributes: the calibration set of the copy cutoff."""
    rng = np.random.default_rng([seed, 103])
    return np.stack([render(sample_scene(rng, scene.key())) for _ in range(n)])


# ----------------------------------------------------------------------------- files


def export_data(out_dir: str | Path, seed: int = 0, n_generic_eval: int | None = None) -> dict[str, object]:
    """Write `prompts.csv` and `train_images.npz` (uint8 `images`, `image_ids`) of `build_data(seed)`,
    with `n_generic_eval` clean generic captions instead of the default (the same first ones)."""
    import pandas as pd

    data = build_data(seed) if n_generic_eval is None else build_data(seed, n_generic_eval=n_generic_eval)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts_csv, images_npz = out / "prompts.csv", out / "train_images.npz"
    pd.DataFrame(data.prompts, columns=list(PROMPT_COLUMNS)).to_csv(prompts_csv, index=False)
    np.savez_compressed(images_npz, images=(data.memorized_images * 255).round().astype(np.uint8),
                        image_ids=np.array([m.image_id for m in data.memorized]))
    return {"prompts_csv": str(prompts_csv), "train_images": str(images_npz),
            "n_prompts": len(data.prompts), "n_images": len(data.memorized)}


def load_prompts(path: str | Path | None = None, seed: int = 0):
    """The labelled prompts: read from `path`, or rebuilt from `seed`."""
    import pandas as pd

    from memscan.demo.data import load_prompts as read_prompts

    if path is None:
        return pd.DataFrame(build_data(seed).prompts, columns=list(PROMPT_COLUMNS))
    return read_prompts(path)
