"""valid-v's scene reader in the mitigation check: what a prompt names, how well it is read, and
agreement computed the same way as for the demo."""

from __future__ import annotations

import numpy as np

from memscan.demo import valid
from memscan.mitigation.check import CheckSettings, agreements, content_for
from memscan.mitigation.scenes import FIELDS, SceneReader, named, scene_renders


def test_named_fields_are_what_the_description_says() -> None:
    scene = valid.Scene("stripes", "lemon", "navy", "diagonal")
    assert named(scene) == {"kind": "stripes", "colour": "lemon", "ground": "navy", "orientation": "diagonal"}
    assert valid.describe(scene.key()) == "diagonal lemon and navy stripes"
    horizon = valid.Scene("horizon", "lime", sky="night", terrain="hills")
    assert named(horizon) == {"kind": "horizon", "colour": "lime", "sky": "night", "terrain": "hills"}
    assert SceneReader.group_of(named(horizon)) == "horizon" and SceneReader.attributes == FIELDS


def test_the_reader_reads_clean_renders_and_agreement_sees_a_wrong_colour() -> None:
    images, scenes = scene_renders(None, n=200, seed=0)
    reader = SceneReader()
    by_kind = reader.accuracy_by_kind(images, scenes)
    assert set(by_kind) == set(valid.KINDS)
    assert all(acc >= 0.9 for fields in by_kind.values() for acc in fields.values()), by_kind
    wanted = [named(s) for s in scenes[:6]]
    checked = {kind: tuple(fields) for kind, fields in by_kind.items()}
    agree, agree_all = agreements(reader, images[:6, None], wanted, checked)
    assert agree.shape == (6,) and np.all(agree >= 0.5)
    other = [{**w, "colour": "white" if w["colour"] != "white" else "navy"} for w in wanted]
    worse, _ = agreements(reader, images[:6, None], other, checked)
    assert np.all(worse < agree)


def test_content_for_valid_v_names_every_memorized_image() -> None:
    data = valid.build_data(0)
    settings = CheckSettings(reader_holdout=100)
    content = content_for("valid-v", data, lambda images: images, settings)
    assert set(content.wanted) == {m.image_id for m in data.memorized}
    some = data.memorized[0]
    assert content.descriptions[some.image_id] == valid.describe(some.attrs.key())
    assert set(content.facts["reader_accuracy_by_kind"]) <= set(valid.KINDS)
    assert all(set(keys) <= set(FIELDS) for keys in content.checked.values())
