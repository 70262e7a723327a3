"""The CLIP BPE tokenizer that Stable Diffusion uses, shipped with memscan so it works offline.

`data/tokenizer/` holds Hugging Face's `vocab.json` + `merges.txt`, rebuilt byte for byte as
openai/clip-vit-large-patch14 ships them from OpenAI's `bpe_simple_vocab_16e6.txt.gz` (MIT, taken
from the open-clip-torch wheel), plus the `tokenizer_config.json` / `special_tokens_map.json` of
SD v1.4's tokenizer folder. Rebuild them with

    python -m memscan.models.tokenizer build /path/to/bpe_simple_vocab_16e6.txt.gz data/tokenizer

memscan ships the vocabulary once: the demo model's `tokenizer/` folder and the demo judge hold
only their tokenizer config, and `clip_tokenizer_for` fills in these files for such a folder.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from memscan.errors import ModelError
from memscan.paths import tokenizer_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
SD2_PAD_TOKEN = "!"  # SD 2.x (open_clip) pads with id 0; SD 1.x pads with EOS_TOKEN (id 49407)
MODEL_MAX_LENGTH = 77
VOCAB_SIZE = 49408
# CLIP keeps 49152 vocabulary entries below the two special tokens: 2 * 256 byte symbols + merges.
N_MERGES = 49152 - 256 - 2
VOCABULARY_FILES = ("vocab.json", "merges.txt")
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
TOKENIZER_FILES = (*VOCABULARY_FILES, *CONFIG_FILES)

_MERGES_HEADER = "#version: 0.2"


def _byte_unicode_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each byte, in vocabulary order (printables first)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(shifted))]


def _special_token(content: str) -> dict[str, object]:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def _dump_json(obj: object) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def _read_merges(bpe_gz: Path) -> list[str]:
    """The first N_MERGES merge lines of OpenAI's BPE file (its first line is a header)."""
    try:
        lines = gzip.decompress(Path(bpe_gz).read_bytes()).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ValueError(f"{bpe_gz}: not a gzip-compressed UTF-8 BPE file ({exc})") from exc
    merges = lines[1 : N_MERGES + 1]
    if len(merges) < N_MERGES or any(len(line.split(" ")) != 2 for line in merges):
        raise ValueError(f"{bpe_gz}: expected {N_MERGES} 'left right' merge lines after the header")
    return merges


def build_tokenizer_files(bpe_gz: Path, out_dir: Path) -> None:
    """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json into `out_dir`.

    vocab.json and merges.txt match openai/clip-vit-large-patch14's byte for byte: the vocabulary is
    the 256 byte symbols, the same with `</w>`, each merge joined, then BOS and EOS, written as one
    line of JSON; merges.txt is a `#version: 0.2` header and the merges, each ending in a newline.
    """
    merges = _read_merges(bpe_gz)
    symbols = _byte_unicode_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *(m.replace(" ", "") for m in merges)]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{bpe_gz}: built {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")

    special = {
        "bos_token": _special_token(BOS_TOKEN),
        "eos_token": _special_token(EOS_TOKEN),
        "pad_token": EOS_TOKEN,
        "unk_token": _special_token(EOS_TOKEN),
    }
    config = {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", **special["bos_token"]},
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **special["eos_token"]},
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": EOS_TOKEN,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", **special["unk_token"]},
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    contents = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "".join(f"{line}\n" for line in [_MERGES_HEADER, *merges]),
        "tokenizer_config.json": _dump_json(config),
        "special_tokens_map.json": _dump_json(special),
    }
    for name, text in contents.items():
        (out_dir / name).write_bytes(text.encode("utf-8"))


def load_clip_tokenizer(pad_token: str = EOS_TOKEN, directory: Path | None = None) -> PreTrainedTokenizerBase:
    """The CLIP tokenizer from the shipped files (never the hub), padding with `pad_token`.

    SD 1.x pads prompts with EOS_TOKEN, SD 2.x with SD2_PAD_TOKEN ("!"); both are in the vocabulary.
    Transformers 5 has a single, Rust-backed CLIPTokenizer, so this is always the fast one.
    """
    from transformers import CLIPTokenizer

    directory = Path(directory) if directory is not None else tokenizer_dir()
    missing = [name for name in ("vocab.json", "merges.txt") if not (directory / name).is_file()]
    if missing:
        raise ModelError(f"CLIP tokenizer files missing in {directory}: {', '.join(missing)}")
    tokenizer = CLIPTokenizer.from_pretrained(str(directory), pad_token=pad_token, local_files_only=True)
    if len(tokenizer) != VOCAB_SIZE:  # an unknown pad token would have been appended as a new id
        raise ModelError(f"pad token {pad_token!r} is not in the CLIP vocabulary of {directory}")
    return tokenizer


def has_vocabulary(folder: str | Path) -> bool:
    """Whether `folder` holds its own BPE vocabulary (vocab.json and merges.txt)."""
    return all((Path(folder) / name).is_file() for name in VOCABULARY_FILES)


def clip_tokenizer_for(source: str | Path) -> PreTrainedTokenizerBase:
    """The CLIP tokenizer of a tokenizer folder or hub id, as `CLIPTokenizer.from_pretrained` reads it.

    A local folder with a tokenizer config but no vocabulary of its own (the demo model's and the
    demo judge's: memscan ships the CLIP BPE files once, in `data/tokenizer/`) gets the shipped
    vocab.json and merges.txt, with every setting (pad token, lower-casing, length) from its config.
    """
    from transformers import CLIPTokenizer

    folder = Path(source)
    if not folder.is_dir() or has_vocabulary(folder):
        return CLIPTokenizer.from_pretrained(str(source))
    if not (folder / "tokenizer_config.json").is_file():
        raise ModelError(f"{folder} holds no CLIP tokenizer (no tokenizer_config.json, no vocab.json)")
    shipped = tokenizer_dir()
    missing = [name for name in VOCABULARY_FILES if not (shipped / name).is_file()]
    if missing:
        raise ModelError(f"CLIP tokenizer files missing in {shipped}: {', '.join(missing)}")
    tokenizer = CLIPTokenizer.from_pretrained(
        str(folder), vocab_file=str(shipped / "vocab.json"), merges_file=str(shipped / "merges.txt"),
        local_files_only=True,
    )
    if len(tokenizer) != VOCAB_SIZE:  # a config naming a token outside the vocabulary appends it
        raise ModelError(f"the tokenizer config of {folder} does not fit the shipped CLIP vocabulary")
    return tokenizer


def write_tokenizer_config(folder: str | Path) -> None:
    """Give a model folder the shipped tokenizer's config files only (the vocabulary is shipped once)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in VOCABULARY_FILES:
        (folder / name).unlink(missing_ok=True)
    for name in CONFIG_FILES:
        (folder / name).write_bytes((tokenizer_dir() / name).read_bytes())


def main(argv: list[str] | None = None) -> int:
    """`python -m memscan.models.tokenizer build BPE_GZ OUT_DIR`: regenerate the shipped files."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or args[0] != "build":
        print("usage: python -m memscan.models.tokenizer build BPE_GZ OUT_DIR", file=sys.stderr)
        return 2
    try:
        build_tokenizer_files(Path(args[1]), Path(args[2]))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(TOKENIZER_FILES)} to {args[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
