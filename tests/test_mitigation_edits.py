"""Candidate edits (delete, substitute, insert, reorder) and substitution neighbours."""

from __future__ import annotations

from memscan.mitigation.edits import Candidate, EditSpace, split_core
from memscan.mitigation.neighbours import TokenNeighbours
from memscan.models.loading import ScoringModel

WORDS = ("framed", "canvas", "print", "of", "the", "Majestic", "tiger,")


def _fixed_substitutes(word: str, k: int) -> list[str]:
    return [f"{word}x", "lion", "cat"][:k]


def test_single_edits_and_their_descriptions() -> None:
    c = Candidate.original(WORDS)
    assert c.text == "framed canvas print of the Majestic tiger,"
    assert c.delete(0).text == "canvas print of the Majestic tiger,"
    assert c.delete(0).edits == ('delete "framed"',)
    assert c.substitute(6, "lion,").text.endswith("Majestic lion,")
    assert c.insert(5, "photo", after=False).text == "framed canvas print of the photo Majestic tiger,"
    assert c.insert(5, "photo", after=True).edits == ('insert "photo" after "Majestic"',)
    swapped = c.swap(5, 6)
    assert swapped.text.endswith("tiger, Majestic")
    assert swapped.edits == ('swap "Majestic" and "tiger,"',)
    two = c.delete(0).substitute(5, "lion,")
    assert two.edits == ('delete "framed"', 'substitute "tiger," -> "lion,"')


def test_positions_follow_the_original_words() -> None:
    c = Candidate.original(WORDS).delete(0).insert(0, "photo", after=False)
    assert c.position(1) == 1  # "canvas" moved back to slot 1
    assert c.position(0) is None  # deleted
    assert c.substitute(1, "paper").position(1) is None  # edited words are not edited again


def test_expand_edits_only_untouched_triggers_and_keeps_punctuation_and_case() -> None:
    space = EditSpace(_fixed_substitutes, n_substitutes=2, insert_words=("photo",))
    c = Candidate.original(WORDS)
    out = space.expand(c, [5, 6])
    texts = [x.text for x in out]
    assert "framed canvas print of the Majesticx tiger," in texts
    assert "framed canvas print of the Majestic lion," in texts
    assert "framed canvas print of the Majestic tigerx," in texts
    # per trigger: deletes of 1..3 words (as many as follow it) + 2 substitutes + 2 inserts + 2 swaps
    assert len(out) == (2 + 2 + 2 + 2) + (1 + 2 + 2 + 1)
    assert "framed canvas print" in texts  # "Majestic tiger," in one edit, and the "of the" it left
    again = space.expand(out[0], [5, 6])  # out[0] deleted "Majestic": only "tiger," is left to edit
    assert all("Majestic" not in e for x in again for e in x.edits[1:])
    assert split_core("(tiger),") == ("(", "tiger", "),")


def test_single_word_prompt_is_not_deleted_to_nothing() -> None:
    space = EditSpace(_fixed_substitutes, n_substitutes=1, insert_words=())
    assert [x.text for x in space.expand(Candidate.original(["tiger"]), [0])] == ["tigerx"]


def test_neighbours_are_whole_words_other_than_the_word_and_its_pieces(tiny_model: ScoringModel) -> None:
    neighbours = TokenNeighbours(tiny_model)
    subs = neighbours.substitutes("clocktower", 20)
    assert len(subs) == 20
    assert all(s.isalpha() and s.isascii() and s not in "clocktower" for s in subs)
    assert neighbours.substitutes("clocktower", 20) == subs  # deterministic
    vocab = tiny_model.tokenizer.get_vocab()
    assert all(f"{s}</w>" in vocab for s in subs)
    assert neighbours.substitutes("", 5) == [] and neighbours.substitutes("tiger", 0) == []


def test_neighbours_are_nearest_in_the_token_embedding_space(tiny_model: ScoringModel) -> None:
    """Brute force over the vocabulary: the first substitute is the closest other whole word."""
    import torch

    table = torch.nn.functional.normalize(tiny_model.text_encoder.get_input_embeddings().weight.detach(), dim=-1)
    vocab = tiny_model.tokenizer.get_vocab()
    query = table[vocab["tiger</w>"]]
    best = max(
        (t.removesuffix("</w>") for t in vocab if t.endswith("</w>")),
        key=lambda w: float(table[vocab[f"{w}</w>"]] @ query)
        if len(w) >= 2 and w.isascii() and w.isalpha() and w not in "tiger" else -2.0,
    )
    assert TokenNeighbours(tiny_model).substitutes("tiger", 1) == [best]


def test_span_deletions_take_only_untouched_original_words() -> None:
    space = EditSpace(lambda word, k: [], insert_words=())
    c = Candidate.original(WORDS)
    spans = [x for x in space.expand(c, [1]) if x.edits[0].startswith("delete")]
    assert [x.edits[0] for x in spans] == ['delete "canvas"', 'delete "canvas print"', 'delete "canvas print of"']
    assert spans[2].text == "framed the Majestic tiger,"
    inserted = c.insert(1, "photo", after=True)  # "framed canvas photo print ...": the span stops at "photo"
    spans = [x.edits[-1] for x in space.expand(inserted, [1]) if x.edits[-1].startswith("delete")]
    assert spans == ['delete "canvas"']
    assert EditSpace(lambda word, k: [], insert_words=(), max_span=1).expand(c, [1])[0].edits == ('delete "canvas"',)


def test_a_trigger_takes_its_whole_clause_and_no_comma_dangles() -> None:
    space = EditSpace(lambda word, k: [], insert_words=(), max_span=1)
    words = "framed canvas print of the tiger, a small orange square".split()
    texts = {x.text for x in space.expand(Candidate.original(words), [1])}
    assert "a small orange square" in texts  # the clause "framed ... tiger," in one edit
    words = "a large yellow square, the sapphire raven of harrowgate".split()
    out = {x.text: x.edits for x in space.expand(Candidate.original(words), [5])}
    assert out["a large yellow square"] == ('delete "the sapphire raven of harrowgate"',)
    assert Candidate.original(words).clause(2) == (0, 4) and Candidate.original(words).clause(4) == (4, 5)
    assert Candidate.original(["one", "clause"]).clause(1) == (0, 2)


def test_a_deletion_takes_the_function_words_it_leaves_dangling() -> None:
    def delete(text: str, pos: int, count: int) -> tuple[str, tuple[str, ...]]:
        c = Candidate.original(text.split()).delete(pos, count)
        return c.text, c.edits

    verbatim = "a small red cross, the crimson compass of silverdale"
    assert delete(verbatim, 5, 4) == ("a small red cross", ('delete "crimson compass of silverdale" and "the"',))
    assert delete(verbatim, 5, 2) == ("a small red cross, of silverdale", ('delete "crimson compass" and "the"',))
    assert delete(verbatim, 6, 1)[0] == "a small red cross, the crimson of silverdale"  # nothing dangles
    template = "framed canvas print of the majestic tiger, a large pink square"
    dropped = ('delete "majestic tiger," and "of the"',)
    assert delete(template, 5, 2) == ("framed canvas print, a large pink square", dropped)
    kept_comma = delete("a large yellow square, the sapphire raven", 3, 1)[0]
    assert kept_comma == "a large yellow, the sapphire raven"
    assert delete("a photo of a large square", 4, 1)[0] == "a photo of a square"  # "of a" was there before
    assert delete("the tiger", 1, 1)[0] == "the"  # never deleted to nothing
