"""Substitutes for a trigger word: its nearest whole words in the text encoder's token-embedding space.

Candidates are vocabulary entries that decode to a whole alphabetic word (CLIP marks word ends
with `</w>`), so every substitute reads as text a user can publish. The word itself, its own
sub-word tokens and any piece of it ("clock" for "clocktower") are excluded: they would carry
the trigger straight back in.
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F

from memscan.models.loading import ScoringModel

_WORD_END = "</w>"


class TokenNeighbours:
    """Cosine nearest neighbours among whole-word tokens of one model's vocabulary."""

    def __init__(self, model: ScoringModel) -> None:
        self.model = model

    @cached_property
    def _table(self) -> torch.Tensor:
        weight = self.model.text_encoder.get_input_embeddings().weight.detach()
        return F.normalize(weight.float().cpu(), dim=-1)

    @cached_property
    def _whole_words(self) -> tuple[torch.Tensor, list[str]]:
        """Ids and texts of the tokens that are whole alphabetic words."""
        vocab = self.model.tokenizer.get_vocab()
        rows = self._table.shape[0]
        pairs = sorted(
            (i, t.removesuffix(_WORD_END)) for t, i in vocab.items()
            if t.endswith(_WORD_END) and i < rows and _is_word(t.removesuffix(_WORD_END))
        )
        return torch.tensor([i for i, _ in pairs], dtype=torch.long), [w for _, w in pairs]

    def substitutes(self, word: str, k: int) -> list[str]:
        """Up to `k` whole words nearest to `word` (mean of its token vectors), nearest first."""
        if k < 1 or not word:
            return []
        ids = list(self.model.tokenizer(word, add_special_tokens=False).input_ids)
        if not ids:
            return []
        query = F.normalize(self._table[ids].mean(dim=0), dim=0)
        candidate_ids, texts = self._whole_words
        order = torch.argsort(self._table[candidate_ids] @ query, descending=True, stable=True)
        lowered = word.lower()
        own = {str(t).removesuffix(_WORD_END) for t in self.model.tokenizer.convert_ids_to_tokens(ids)}
        out: list[str] = []
        for index in order.tolist():
            text = texts[index]
            if text in own or text in lowered:  # the word, its tokens, any piece of it
                continue
            out.append(text)
            if len(out) == k:
                break
        return out


def _is_word(text: str) -> bool:
    return len(text) >= 2 and text.isascii() and text.isalpha()
