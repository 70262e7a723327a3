"""Candidate text edits of a prompt around its trigger words: delete, substitute, insert, reorder.

Deletions also take a trigger together with the one or two original words after it, or the whole
comma-delimited clause that holds it: memorized triggers are often names and titles of several
words ("the majestic tiger", "framed canvas print of ..."), which a search of a few rounds cannot
take apart one word at a time.

A deletion also takes the function words it leaves dangling ("a small red cross, the" loses
"the"; "the of ashford" loses "the"): a rewrite is text a user publishes, not a token string.

A candidate is a sequence of word slots that remember which original word they hold, so later
rounds of the search keep editing the original triggers and never re-edit a word they changed.
Each edit is recorded as a short human-readable string (the `edits` column of the output).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

NEUTRAL_WORDS = ("photo", "picture", "image", "artwork")

_CLAUSE_END = (",", ";")
# Articles and prepositions: what a deletion can leave dangling ("a small red cross, the").
FUNCTION_WORDS = frozenset("a an the of in on at with and by for to from".split())
ARTICLES = frozenset(("a", "an", "the"))
_CORE = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)


@dataclass(frozen=True)
class Slot:
    """One word of a candidate; `origin` is its index in the original prompt (None if inserted)."""

    text: str
    origin: int | None
    edited: bool = False


@dataclass(frozen=True)
class Candidate:
    """A rewrite of the original prompt and the edits that made it."""

    slots: tuple[Slot, ...]
    edits: tuple[str, ...] = ()

    @classmethod
    def original(cls, words: Sequence[str]) -> Candidate:
        return cls(tuple(Slot(w, i) for i, w in enumerate(words)))

    @property
    def text(self) -> str:
        return " ".join(slot.text for slot in self.slots)

    def position(self, origin: int) -> int | None:
        """Slot index of the untouched original word `origin`, if it is still there."""
        for pos, slot in enumerate(self.slots):
            if slot.origin == origin and not slot.edited:
                return pos
        return None

    def _with(self, slots: list[Slot], edit: str) -> Candidate:
        return Candidate(tuple(slots), (*self.edits, edit))

    def delete(self, pos: int, count: int = 1) -> Candidate:
        """Drop `count` adjacent words from `pos` (a multi-word trigger goes in one edit) and the
        function words that leaves dangling; the clause's comma stays where a clause goes on."""
        slots = list(self.slots)
        removed = slots[pos : pos + count]
        edit = f'delete "{" ".join(slot.text for slot in removed)}"'
        del slots[pos : pos + count]
        comma = removed[-1].text[-1] if removed[-1].text.endswith(_CLAUSE_END) else ""
        dangling = _dangling(slots, pos, clause_ends=comma != "" or pos == len(slots))
        if len(dangling) < len(slots):
            if dangling:
                edit += f' and "{" ".join(slots[i].text for i in dangling)}"'
            pos -= sum(i < pos for i in dangling)
            slots = [slot for i, slot in enumerate(slots) if i not in dangling]
        if comma and 0 < pos < len(slots) and not slots[pos - 1].text.endswith(_CLAUSE_END):
            slots[pos - 1] = replace(slots[pos - 1], text=slots[pos - 1].text + comma)
        if pos == len(slots) and slots and slots[-1].text.endswith(_CLAUSE_END):
            slots[-1] = replace(slots[-1], text=slots[-1].text.rstrip("".join(_CLAUSE_END)))
        return self._with(slots, edit)

    def clause(self, pos: int) -> tuple[int, int]:
        """(start, count) of the comma- or semicolon-delimited clause holding slot `pos`."""
        start = pos
        while start > 0 and not self.slots[start - 1].text.endswith(_CLAUSE_END):
            start -= 1
        stop = pos
        while stop < len(self.slots) - 1 and not self.slots[stop].text.endswith(_CLAUSE_END):
            stop += 1
        return start, stop - start + 1

    def substitute(self, pos: int, text: str) -> Candidate:
        slots = list(self.slots)
        old = slots[pos]
        slots[pos] = replace(old, text=text, edited=True)
        return self._with(slots, f'substitute "{old.text}" -> "{text}"')

    def insert(self, pos: int, word: str, *, after: bool) -> Candidate:
        slots = list(self.slots)
        anchor = slots[pos].text
        slots.insert(pos + 1 if after else pos, Slot(word, None))
        return self._with(slots, f'insert "{word}" {"after" if after else "before"} "{anchor}"')

    def swap(self, pos: int, other: int) -> Candidate:
        slots = list(self.slots)
        slots[pos], slots[other] = slots[other], slots[pos]
        return self._with(slots, f'swap "{slots[other].text}" and "{slots[pos].text}"')


def _dangling(slots: Sequence[Slot], gap: int, *, clause_ends: bool) -> list[int]:
    """Indices of the function words a deletion just before `slots[gap]` leaves dangling: those
    right before the gap where the clause now ends there ("a small red cross, the"), the
    articles right before it where another function word follows ("the of ashford"), and a whole
    clause left with nothing but function words."""
    start = gap
    while start > 0 and not slots[start - 1].text.endswith(_CLAUSE_END):
        start -= 1
    before = []
    for i in range(gap - 1, start - 1, -1):
        if not _is_function_word(slots[i].text) or (not clause_ends and _core(slots[i].text) not in ARTICLES):
            break
        before.insert(0, i)
    if not clause_ends and not (gap < len(slots) and _is_function_word(slots[gap].text)):
        before = []
    stop = gap  # one past the clause's last slot (the one that carries its comma)
    while stop < len(slots) and not clause_ends:
        stop += 1
        if slots[stop - 1].text.endswith(_CLAUSE_END):
            break
    rest = [i for i in range(start, stop) if i not in before]
    if rest and all(_is_function_word(slots[i].text) for i in rest):
        return list(range(start, stop))
    return before


def _core(text: str) -> str:
    return split_core(text)[1].lower()


def _is_function_word(text: str) -> bool:
    return _core(text) in FUNCTION_WORDS


def split_core(word: str) -> tuple[str, str, str]:
    """(leading punctuation, the word proper, trailing punctuation): substitutes replace the core."""
    match = _CORE.match(word)
    assert match is not None  # the pattern matches every string
    return match.group(1), match.group(2), match.group(3)


@dataclass
class EditSpace:
    """Which edits to try around each trigger word, and how many of each."""

    substitutes_for: Callable[[str, int], list[str]]
    n_substitutes: int = 8
    insert_words: tuple[str, ...] = NEUTRAL_WORDS
    max_span: int = 3  # most adjacent original words one deletion removes
    _cache: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def substitutes(self, word: str) -> list[str]:
        """Substitutes of `word`, its punctuation kept and its capital kept (cached per word)."""
        if word not in self._cache:
            lead, core, trail = split_core(word)
            found = self.substitutes_for(core, self.n_substitutes) if core else []
            if core[:1].isupper():
                found = [w.capitalize() for w in found]
            self._cache[word] = [f"{lead}{w}{trail}" for w in found]
        return self._cache[word]

    def expand(self, candidate: Candidate, triggers: Sequence[int]) -> list[Candidate]:
        """Every single edit of `candidate` at the still-untouched trigger words `triggers`."""
        out: list[Candidate] = []
        for origin in triggers:
            pos = candidate.position(origin)
            if pos is None:
                continue
            word = candidate.slots[pos].text
            spans = [(pos, count) for count in range(1, self.max_span + 1)]  # the word and the words after it
            spans.append(candidate.clause(pos))  # the clause that holds it
            for start, count in dict.fromkeys(spans):
                span = candidate.slots[start : start + count]
                untouched = all(not slot.edited and slot.origin is not None for slot in span)
                if untouched and len(span) == count < len(candidate.slots):
                    out.append(candidate.delete(start, count))
            out += [candidate.substitute(pos, sub) for sub in self.substitutes(word)]
            for neutral in self.insert_words:
                out.append(candidate.insert(pos, neutral, after=False))
                out.append(candidate.insert(pos, neutral, after=True))
            out += [candidate.swap(pos, other) for other in (pos - 1, pos + 1) if 0 <= other < len(candidate.slots)]
        return out
