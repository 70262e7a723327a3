"""The shipped CLIP tokenizer: known ids, padding, truncation, and a byte-for-byte rebuild."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import unicodedata
from pathlib import Path

import pytest
import regex
import torch

from memscan.errors import ModelError
from memscan.models.tokenizer import (
    EOS_TOKEN,
    MODEL_MAX_LENGTH,
    N_MERGES,
    SD2_PAD_TOKEN,
    TOKENIZER_FILES,
    VOCAB_SIZE,
    build_tokenizer_files,
    load_clip_tokenizer,
)
from memscan.paths import tokenizer_dir

BOS_ID, EOS_ID = 49406, 49407


@pytest.fixture(scope="module")
def tok():
    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def vocab() -> dict[str, int]:
    return json.loads((tokenizer_dir() / "vocab.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def merges() -> list[str]:
    return (tokenizer_dir() / "merges.txt").read_text(encoding="utf-8").split("\n")


def _bpe_gz() -> Path | None:
    """OpenAI's BPE file, if this machine has it (never downloaded by the tests)."""
    env = os.environ.get("MEMSCAN_CLIP_BPE_GZ")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("open_clip")
    if spec and spec.origin:
        candidate = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
        if candidate.is_file():
            return candidate
    return None


def test_vocab_layout(vocab, merges):
    assert len(vocab) == VOCAB_SIZE
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE))
    # 256 byte symbols, then the same with </w>, then one token per merge, then BOS, EOS.
    assert vocab["!"] == 0 and vocab["a"] == ord("a") - ord("!")
    assert vocab["!</w>"] == 256 and vocab["a</w>"] == 256 + 64 == 320
    assert vocab["<|startoftext|>"] == BOS_ID and vocab["<|endoftext|>"] == EOS_ID
    assert merges[0] == "#version: 0.2" and merges[-1] == ""  # header, and a newline after each line
    assert len(merges) == 1 + N_MERGES + 1
    # merge line n (1-based after the header) is token 511 + n
    for n in (1, 614, 1857, N_MERGES):
        assert vocab[merges[n].replace(" ", "")] == 511 + n


def test_known_ids_match_the_vocabulary(tok, merges):
    ids = tok("a photo of a cat").input_ids
    assert ids == [BOS_ID, 320, 1125, 539, 320, 2368, EOS_ID]
    # derive each word's id from merges.txt independently of the tokenizer
    line_of = {line.replace(" ", ""): n for n, line in enumerate(merges) if n}
    assert [511 + line_of[w + "</w>"] for w in ("photo", "of", "cat")] == [1125, 539, 2368]
    assert tok.convert_ids_to_tokens(ids) == [
        "<|startoftext|>",
        "a</w>",
        "photo</w>",
        "of</w>",
        "a</w>",
        "cat</w>",
        "<|endoftext|>",
    ]
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"


def test_lower_cases_and_collapses_whitespace(tok):
    assert tok("A  PHOTO\tOf a\nCat").input_ids == tok("a photo of a cat").input_ids


@pytest.mark.parametrize(("pad_token", "pad_id"), [(EOS_TOKEN, EOS_ID), (SD2_PAD_TOKEN, 0)])
def test_pads_to_77_with_the_chosen_pad_id(pad_token, pad_id):
    tok = load_clip_tokenizer(pad_token=pad_token)
    assert tok.pad_token_id == pad_id and len(tok) == VOCAB_SIZE
    enc = tok("a photo of a cat", padding="max_length", max_length=MODEL_MAX_LENGTH, truncation=True)
    assert len(enc.input_ids) == MODEL_MAX_LENGTH
    assert enc.input_ids[:7] == [BOS_ID, 320, 1125, 539, 320, 2368, EOS_ID]
    assert enc.input_ids[7:] == [pad_id] * (MODEL_MAX_LENGTH - 7)
    assert enc.attention_mask == [1] * 7 + [0] * (MODEL_MAX_LENGTH - 7)


def test_truncates_long_prompts_to_77_ending_in_eos(tok):
    prompt = " ".join(f"word{i}" for i in range(200))
    ids = tok(prompt, truncation=True).input_ids  # model_max_length is 77
    assert tok.model_max_length == MODEL_MAX_LENGTH
    assert len(ids) == MODEL_MAX_LENGTH and ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert ids[1:-1] == tok(prompt).input_ids[1 : MODEL_MAX_LENGTH - 1]


def test_unknown_pad_token_is_refused():
    with pytest.raises(ModelError, match="not in the CLIP vocabulary"):
        load_clip_tokenizer(pad_token="<pad>")


def test_missing_files_raise_model_error(tmp_path):
    with pytest.raises(ModelError, match="vocab.json, merges.txt"):
        load_clip_tokenizer(directory=tmp_path)


def _reference_encode(text: str, vocab: dict[str, int], merges: list[str]) -> list[int]:
    """OpenAI's simple_tokenizer.py BPE in plain Python (without ftfy, which only the reference has)."""
    ranks = {tuple(line.split(" ")): i for i, line in enumerate(merges[1 : N_MERGES + 1])}
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in printable]
    byte_char = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(rest)}
    pattern = regex.compile(
        r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        regex.IGNORECASE,
    )
    text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()
    ids = [BOS_ID]
    for piece in pattern.findall(text):
        word = [byte_char[b] for b in piece.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:], strict=False)}
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids += [vocab[w] for w in word]
    return [*ids, EOS_ID]


@pytest.mark.parametrize(
    "text",
    [
        "a photo of a cat",
        "Héllo Wörld, café naïve — 日本語の写真 🙂🙂!!",
        "  extra   spaces\tand\nnewlines  ",
        "DON'T stop: it's 2024... (really?!) #art @user $5.99 100%",
        "e\u0301cole",  # decomposed accent, NFC-normalised to école
        "!!!???...,,,;;;",
    ],
)
def test_fast_tokenizer_matches_reference_bpe(tok, vocab, merges, text):
    # Transformers 5 has no slow (Python) CLIPTokenizer, so compare against OpenAI's algorithm.
    assert tok(text).input_ids == _reference_encode(text, vocab, merges)


def test_rebuild_reproduces_shipped_files_byte_for_byte(tmp_path):
    bpe_gz = _bpe_gz()
    if bpe_gz is None or not bpe_gz.is_file():
        pytest.skip(
            "bpe_simple_vocab_16e6.txt.gz not available; set MEMSCAN_CLIP_BPE_GZ or install open_clip"
        )
    readme = (tokenizer_dir() / "README.md").read_text(encoding="utf-8")
    assert hashlib.sha256(bpe_gz.read_bytes()).hexdigest() in readme
    build_tokenizer_files(bpe_gz, tmp_path)
    for name in TOKENIZER_FILES:
        assert (tmp_path / name).read_bytes() == (tokenizer_dir() / name).read_bytes(), name


def test_build_rejects_a_non_gzip_file(tmp_path):
    bogus = tmp_path / "bpe.txt.gz"
    bogus.write_text("not gzip")
    with pytest.raises(ValueError, match="not a gzip-compressed"):
        build_tokenizer_files(bogus, tmp_path / "out")


@pytest.mark.parametrize("pad_token", [EOS_TOKEN, SD2_PAD_TOKEN])
def test_tokenize_equals_the_pipelines_padding_and_truncation(pad_token):
    """memscan.models.text.tokenize pads in one BPE pass; the ids and mask must be the pipeline's own."""
    from types import SimpleNamespace

    from memscan.models.text import tokenize

    tokenizer = load_clip_tokenizer(pad_token=pad_token)
    prompts = ["", "a photo of a cat", "masterpiece, [blurry], a cat", "🐱 猫の写真 кошка", "word " * 200,
               "x" * 10000, "a " * 74, "a " * 75, "a " * 76]
    got = tokenize(SimpleNamespace(tokenizer=tokenizer), prompts)
    want = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(got.input_ids, want.input_ids)
    assert torch.equal(got.attention_mask, want.attention_mask)
    assert got.truncated == [False, False, False, False, True, True, False, False, True]
