"""Read what a valid-v image shows (scene kind, colours, orientation, sky, terrain, glyph): the
utility half of the mitigation check on memscan's second test model.

The demo's reader (`memscan.mitigation.attributes`) is fitted on the demo's decoder; valid-v's
world comes with a rule-based reader (`memscan.demo.valid.read_attributes`: colours by the
nearest palette entry, the kind and orientation from the structure of the colour map). It is
measured, not trusted: `accuracy_by_kind` reads VAE round trips of fresh random scenes, and only
the fields read right on at least `min_accuracy` of a kind's round trips are checked for prompts
of that kind. It has the AttributeReader's interface (`read`, `group_of`, `attributes`), so
`memscan.mitigation.check.agreements` works with either.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

FIELDS = ("kind", "colour", "ground", "orientation", "sky", "terrain", "glyph")


def named(scene: object) -> dict[str, str]:
    """What a full description of `scene` (a valid-v Scene) names: its non-empty key fields."""
    return {field: value for field, value in zip(FIELDS, scene.key(), strict=True) if value}  # type: ignore[attr-defined]


class SceneReader:
    """valid-v's rule-based reader with the interface of the demo's AttributeReader."""

    attributes = FIELDS

    def read(self, images: np.ndarray) -> list[dict[str, str]]:
        """What each of `images` (N, 3, H, W) in [0, 1] shows."""
        from memscan.demo.valid import read_attributes

        return [read_attributes(image) for image in images]

    @staticmethod
    def group_of(wanted: Mapping[str, str]) -> str:
        """The group whose accuracy decides which fields count: the scene kind."""
        return wanted["kind"]

    def accuracy_by_kind(self, images: np.ndarray, scenes: Sequence[object]) -> dict[str, dict[str, float]]:
        """Per scene kind, the share of `images` whose named fields (each) the reader gets right."""
        read = self.read(images)
        out: dict[str, dict[str, float]] = {}
        for kind in sorted({s.kind for s in scenes}):  # type: ignore[attr-defined]
            rows = [(r, named(s)) for r, s in zip(read, scenes, strict=True) if s.kind == kind]  # type: ignore[attr-defined]
            fields = [f for f in FIELDS if f in rows[0][1]]
            out[kind] = {f: float(np.mean([r[f] == w[f] for r, w in rows])) for f in fields}
        return out


def scene_renders(decode: Callable[[np.ndarray], np.ndarray] | None, *, n: int, seed: int
                  ) -> tuple[np.ndarray, list[object]]:
    """`n` random valid-v scenes rendered (optionally through `decode`), and the scenes."""
    from memscan.demo.valid import render, sample_scene

    rng = np.random.default_rng([seed, 17])
    scenes = [sample_scene(rng) for _ in range(n)]
    images = np.stack([render(s) for s in scenes])
    return (images if decode is None else decode(images)), scenes
