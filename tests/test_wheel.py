"""The built wheel and sdist: what they carry, and that an installed wheel works outside the checkout.

The wheel is built from this checkout (`pip wheel --no-deps --no-build-isolation`, hatchling from
the `dev` extra), installed with `pip install --no-deps --target` into a clean folder, and run with
this venv's interpreter from a temporary directory with that folder alone on PYTHONPATH, offline:
the shipped profiles, demo model, judge, tokenizer and benchmark lists must all come from the
installed package, never from the repository.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
LICENSE_FILES = ("LICENSE", "THIRD_PARTY_NOTICES.md")
# two memorized and two clean prompts of the demo (data/demo/prompts.csv)
PROMPTS = """id,prompt,label,kind,train_image_id
m1,"a large yellow square, the sapphire raven of harrowgate",memorized,verbatim,v00
m2,"framed canvas print of the majestic tiger, a small orange square",memorized,template,t00
c1,a small purple triangle,not_memorized,generic,
c2,"a purple diamond, the sunny bridge of greystone",not_memorized,generic,
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The wheel and the sdist of this checkout, built offline with hatchling."""
    pytest.importorskip("hatchling", reason="the wheel is built with hatchling (pip install -e '.[dev]')")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), str(REPO)],
                   check=True, capture_output=True, text=True)
    code = f"import hatchling.build as b; b.build_sdist({str(out)!r})"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True)
    (wheel,) = out.glob("memscan-*.whl")
    (sdist,) = out.glob("memscan-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


@pytest.fixture(scope="module")
def installed(built: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed, without dependencies, into a folder of its own."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([*PIP, "install", "--no-deps", "--no-index", "--target", str(target), str(built["wheel"])],
                   check=True, capture_output=True, text=True)
    return target


def _wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_wheel_ships_the_tokenizer_once_and_the_licences(built: dict[str, Path]) -> None:
    names = _wheel_names(built["wheel"])
    basenames = Counter(name.rsplit("/", 1)[-1] for name in names)
    assert basenames["vocab.json"] == 1 and basenames["merges.txt"] == 1
    assert "memscan/py.typed" in names
    with zipfile.ZipFile(built["wheel"]) as archive:
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert f"\nVersion: {__import__('memscan').__version__}\n" in metadata  # one version source
    assert "\nLicense-Expression: MIT\n" in metadata
    dist_info = [name for name in names if ".dist-info/" in name]
    for license_file in LICENSE_FILES:
        assert any(name.endswith(f"/licenses/{license_file}") for name in dist_info), license_file
    for shipped in ("memscan/configs/demo.toml", "memscan/data/demo/model/model_index.json",
                    "memscan/data/demo/judge/model.safetensors", "memscan/data/valid-v/judge/model.safetensors",
                    "memscan/data/words/english.txt",
                    "memscan/data/benchmark/sd1_mem.txt",
                    "memscan/data/tokenizer/vocab.json", "memscan/configs/architectures/sd-v1/unet/config.json"):
        assert shipped in names


def test_sdist_carries_the_licences_and_no_scratch(built: dict[str, Path]) -> None:
    with tarfile.open(built["sdist"]) as archive:
        names = [name.split("/", 1)[1] for name in archive.getnames() if "/" in name]
    for required in (*LICENSE_FILES, "pyproject.toml", "README.md", "memscan/__init__.py", "configs/demo.toml",
                     "data/tokenizer/vocab.json", "data/demo/model/model_index.json"):
        assert required in names
    assert not any(name.startswith(("scratch/", ".venv/")) for name in names)
    assert Counter(name.rsplit("/", 1)[-1] for name in names)["vocab.json"] == 1


def _run(args: list[str], cwd: Path, target: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEMSCAN_", "PYTHON"))}
    env.update(PYTHONPATH=str(target), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONNOUSERSITE="1")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# One interpreter (torch is imported once, as it dominates the time): the CLI commands as the
# console script runs them, then the Python API; prints the exit codes and facts as one JSON line.
DRIVER = """
import json, sys
import memscan
import memscan.paths
from memscan.cli import app

def cli(*args):
    try:
        app(list(args), prog_name="memscan")
    except SystemExit as exc:
        return exc.code or 0
    return 0

codes = {
    "detect": cli("detect", "x.csv", "-o", "s.parquet", "--id-column", "id"),
    "mitigate": cli("mitigate", "s.parquet", "-o", "r.parquet", "--max-edits", "1", "--beam-width", "2",
                    "--verify-noise", "1"),
    "bench": cli("bench", "--limit", "2", "--methods", "anisotropy", "--out-dir", "bench"),
    "demo score": cli("demo", "score", "--prompts", "x.csv", "--out", "demo.csv"),
}
rows = memscan.score_prompts(["a large yellow square, the sapphire raven of harrowgate"], memscan.load_model("demo"))
print(json.dumps({"codes": codes, "file": memscan.__file__, "score": float(rows["score"][0]),
                  "data": str(memscan.paths.data_dir()), "configs": str(memscan.paths.config_dir())}))
"""


def test_installed_wheel_works_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "x.csv").write_text(PROMPTS)

    script = _run([str(installed / "bin" / "memscan"), "--version"], work, installed)  # the console script
    assert script.returncode == 0 and __import__("memscan").__version__ in script.stdout, script.stderr

    driver = _run([sys.executable, "-c", DRIVER], work, installed)
    assert driver.returncode == 0, driver.stderr
    facts = json.loads(driver.stdout.strip().splitlines()[-1])
    assert facts["codes"] == {"detect": 0, "mitigate": 0, "bench": 0, "demo score": 0}, driver.stderr
    for key in ("file", "data", "configs"):  # the installed copy, not this checkout
        assert Path(facts[key]).resolve().is_relative_to(installed.resolve()), facts

    scores = pd.read_parquet(work / "s.parquet").set_index("prompt_id")
    assert (scores["status"] == "ok").all()
    assert scores["flagged"].to_dict() == {"m1": True, "m2": True, "c1": False, "c2": False}  # the demo threshold
    assert facts["score"] == pytest.approx(scores.loc["m1", "score"], rel=1e-6)
    rewritten = pd.read_parquet(work / "r.parquet")
    assert sorted(rewritten["prompt_id"]) == ["m1", "m2"]
    assert set(rewritten["status"]) <= {"ok", "unresolved"}
    assert len(pd.read_csv(work / "bench" / "labels.csv")) == 4  # --limit 2 a class, from the installed data
    demo = pd.read_csv(work / "demo.csv")
    assert len(demo) == 4 and demo["score"].notna().all()
