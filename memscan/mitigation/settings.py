"""Settings of `memscan mitigate`: the detect settings it scores with, plus the search's own."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from memscan.config import DetectSettings
from memscan.errors import UsageError
from memscan.mitigation.edits import NEUTRAL_WORDS
from memscan.mitigation.similarity import check_similarity

if TYPE_CHECKING:
    from memscan.models.profiles import ModelProfile

PREFER = ("score", "similarity")


@dataclass(frozen=True)
class MitigateSettings:
    """What `memscan mitigate` was asked to do; `detect` holds model, noise and batch settings (its
    method, n_noise and seed, when not given, are the profile's calibration values, so that the
    profile's threshold is the target)."""

    detect: DetectSettings = field(default_factory=DetectSettings)
    target: float | None = None  # None: the profile's calibrated threshold
    min_similarity: float = 0.8
    similarity: str | None = None  # pooled | tokens; None: the profile's text_similarity
    prefer: str = "score"  # which winner of a round is kept: score (lowest) or similarity (closest)
    beam_width: int = 4
    max_edits: int = 4
    n_triggers: int = 7  # words (by attribution) the edits may touch
    report_triggers: int = 3  # tokens listed in `trigger_tokens`
    n_substitutes: int = 8
    substitute_words: str = "english"  # english | a word-list file | embedding (the token table's neighbours)
    verify_noise: int = 4  # noises of the independent bank that must confirm a rewrite; 0 = off
    insert_words: tuple[str, ...] = NEUTRAL_WORDS
    all_rows: bool = False
    emit_embeddings: Path | None = None
    embedding_steps: int = 50
    embedding_lr: float = 0.05
    embedding_depth: float = 0.0  # aim this share of the starting gap under the target (optimise_embedding)
    embedding_late: float | None = None  # also a late embedding, used from this share of the steps (mitigation.late)
    generation_steps: int = 50  # the DDIM generation a late embedding is made for: steps ...
    guidance_scale: float = 7.5  # ... and classifier-free guidance
    late_noise: int = 4  # trajectories (independent noise) a late embedding is optimised on

    def __post_init__(self) -> None:
        if self.similarity is not None:
            check_similarity(self.similarity)
        if self.prefer not in PREFER:
            raise UsageError(f"--prefer must be one of {', '.join(PREFER)}, got {self.prefer!r}")
        if not -1.0 <= self.min_similarity <= 1.0:
            raise UsageError(f"--min-similarity must be in [-1, 1], got {self.min_similarity}")
        for name in ("beam_width", "max_edits", "n_triggers", "report_triggers"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.n_substitutes < 0 or self.embedding_steps < 0 or self.verify_noise < 0:
            raise UsageError("--substitutes, --embedding-steps and --verify-noise must be >= 0")
        if self.embedding_depth < 0:
            raise UsageError(f"--embedding-depth must be >= 0, got {self.embedding_depth}")
        if self.embedding_late is not None:
            if not 0 < self.embedding_late < 1:
                raise UsageError(f"--embedding-late must be a share of the steps in (0, 1), got {self.embedding_late}")
            if self.emit_embeddings is None:
                raise UsageError("--embedding-late needs --emit-embeddings (the late embeddings are saved beside them)")
        if self.generation_steps < 2 or self.late_noise < 1 or self.guidance_scale < 0:
            raise UsageError(f"--generation-steps must be >= 2 and --guidance-scale >= 0 (and late_noise >= 1), got "
                             f"{self.generation_steps}, {self.guidance_scale} and {self.late_noise}")
        if self.embedding_lr <= 0:
            raise UsageError(f"--embedding-lr must be > 0, got {self.embedding_lr}")
        if not self.substitute_words.strip():
            raise UsageError("--substitute-words must be english, embedding or a word-list file")
        if self.substitute_words not in ("english", "embedding"):  # a file: as every worker must see it
            object.__setattr__(self, "substitute_words", str(Path(self.substitute_words).expanduser().resolve()))
        if self.substitute_words != "embedding":
            from memscan.mitigation.words import read_words

            read_words(self.substitute_words)  # an unreadable or empty list fails here, before any model loads
        if any(not w or any(c.isspace() for c in w) for w in self.insert_words):
            raise UsageError("--insert-words must be single words")


def no_target_error(detect: DetectSettings, profile: ModelProfile, method: str) -> UsageError:
    """The error when there is no --target and the profile's threshold cannot be one: it has none, or
    it was calibrated for other settings (named: which setting differs, and how)."""
    from memscan.detect import threshold_conflicts

    if profile.threshold is None:
        why = "it has no threshold (not calibrated: see `memscan calibrate`)"
    else:
        reasons = threshold_conflicts(detect, profile, method)
        why = f"its threshold does not hold for these settings: {'; '.join(reasons) or 'unknown'}"
    return UsageError(f"no target score: model profile {profile.name!r}: {why}; pass --target, or run with the "
                      "settings the profile was calibrated with")
