"""Prompt input: files of prompts in several formats, read as canonical DataFrames."""

from __future__ import annotations

from memscan.io.readers import FORMATS, OUTPUT_COLUMNS, PromptSource, read_prompts

__all__ = ["FORMATS", "OUTPUT_COLUMNS", "PromptSource", "read_prompts"]
