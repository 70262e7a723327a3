"""The Python API as a user meets it: the README's snippets, the public names, `help`, typing, version."""

from __future__ import annotations

import importlib.metadata
import inspect
import pydoc
import re
import subprocess
import sys
from pathlib import Path

import pytest

import memscan

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RESULT_TYPES = ("DetectResult", "RunOutcome", "Evaluation", "MitigateResult", "BenchResult", "Calibration")


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def test_readme_python_snippets_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ```python block of the README, in a folder with a prompts.csv, on the demo model."""
    blocks = _python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "the README has no python snippet"
    (tmp_path / "prompts.csv").write_text(
        "prompt\n\"a large yellow square, the sapphire raven of harrowgate\"\na small purple triangle\n"
    )
    monkeypatch.chdir(tmp_path)
    import memscan.detect  # noqa: F401 - the submodule imported first, as any earlier call does

    for block in blocks:
        namespace: dict[str, object] = {}
        exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "scores.parquet").is_file()
    result = namespace["result"]
    assert isinstance(result, memscan.DetectResult) and len(result.scores) == 2


def test_public_functions_are_not_shadowed_by_their_modules() -> None:
    import memscan.detect
    import memscan.evaluate
    from memscan.detect import detect
    from memscan.evaluate import evaluate

    assert memscan.detect is detect and memscan.evaluate is evaluate
    assert callable(memscan.detect) and callable(memscan.evaluate)
    assert sys.modules["memscan.detect"].score_prompts is memscan.score_prompts  # the module is still there


def test_every_public_name_resolves_and_is_listed() -> None:
    assert set(memscan._EXPORTS) <= set(memscan.__all__)
    for name in memscan.__all__:
        assert getattr(memscan, name) is not None, name
        assert name in dir(memscan), name
    for name in RESULT_TYPES:
        assert name in memscan.__all__ and inspect.isclass(getattr(memscan, name)), name
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        memscan.nonsense  # noqa: B018


def test_help_shows_the_public_api() -> None:
    text = pydoc.render_doc(memscan, renderer=pydoc.plaintext)
    for name in ("detect", "score_prompts", "load_model", "evaluate", "mitigate", "DetectSettings", *RESULT_TYPES):
        assert re.search(rf"\b{name}\b", text), name
    assert "detect(input_path" in text  # the function's signature, not a module


def test_package_is_typed_and_import_is_cheap() -> None:
    assert (Path(memscan.__file__).parent / "py.typed").is_file()
    code = "import sys, memscan, memscan.cli; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_pointers_to_files_users_do_not_have() -> None:
    """Code and docs name no machine path (the project workspace, a shared /tmp folder on
    PYTHONPATH) and no file that is not shipped (scratch notes)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    own = {"tests/test_package.py", "tests/test_wheel.py"}
    pattern = re.compile(r"/work/|\.\./shared/|/tmp/site|\bscratch/")
    hits = []
    for name in listed.stdout.splitlines():
        path = REPO / name
        if name in own or path.suffix not in (".py", ".sh", ".md", ".toml") or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{name}:{number}: {line.strip()}")
    assert hits == []


def test_one_version_source() -> None:
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    project = pyproject.split("[project]", 1)[1].split("\n[", 1)[0]
    assert not re.search(r"^version\s*=", project, flags=re.M)
    assert re.search(r'^dynamic\s*=\s*\["version"\]', project, flags=re.M)
    assert '[tool.hatch.version]\npath = "memscan/__init__.py"' in pyproject
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", memscan.__version__)
    assert importlib.metadata.version("memscan") == memscan.__version__


# ------------------------------------------------------------------------------ shipped data


def test_the_clip_vocabulary_is_shipped_once() -> None:
    from memscan.paths import data_dir, tokenizer_dir

    for name in ("vocab.json", "merges.txt"):
        assert sorted(data_dir().rglob(name)) == [tokenizer_dir() / name]


TOKENIZER_TEXTS = [
    "a large yellow square, the sapphire raven of harrowgate", "", "Hello WORLD!!  ünïcode 東京 🙂",
    " ".join(["framed canvas print of the dancing wizard"] * 20),  # longer than 77 tokens
]


@pytest.mark.parametrize("folder", ["demo/model/tokenizer", "demo/judge", "valid-v/judge"])
def test_a_config_only_tokenizer_folder_gets_the_shipped_vocabulary(folder: str, tmp_path: Path) -> None:
    """The demo model's and the judges' tokenizer, filled in from data/tokenizer, is the tokenizer the
    same folder with its own copy of the vocabulary gives."""
    import shutil

    from transformers import CLIPTokenizer

    from memscan.models.tokenizer import VOCAB_SIZE, VOCABULARY_FILES, clip_tokenizer_for
    from memscan.paths import data_dir, tokenizer_dir

    source = data_dir() / folder
    complete = tmp_path / "complete"
    complete.mkdir()
    for path in [*source.glob("*.json"), *(tokenizer_dir() / name for name in VOCABULARY_FILES)]:
        shutil.copyfile(path, complete / path.name)
    filled, reference = clip_tokenizer_for(source), CLIPTokenizer.from_pretrained(complete)
    assert len(filled) == len(reference) == VOCAB_SIZE
    assert (filled.pad_token, filled.model_max_length) == (reference.pad_token, reference.model_max_length)
    for padding in ("max_length", "longest"):
        kwargs = {"padding": padding, "max_length": 77, "truncation": True}
        assert filled(TOKENIZER_TEXTS, **kwargs).input_ids == reference(TOKENIZER_TEXTS, **kwargs).input_ids


def test_the_demo_model_loads_with_the_full_vocabulary() -> None:
    from memscan.models.tokenizer import VOCAB_SIZE, load_clip_tokenizer

    tokenizer = memscan.load_model("demo").tokenizer
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer(TOKENIZER_TEXTS).input_ids == load_clip_tokenizer()(TOKENIZER_TEXTS).input_ids
