"""A wheel of the project carries every file the packages read at run time (vocabulary, task registry, model
config, the web page), and an installed copy finds them outside the source checkout."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(ROOT)], check=True, cwd=build, capture_output=True)
    (found,) = out.glob("*.whl")
    return found


def test_wheel_carries_the_runtime_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("vilbert/data/bert-base-uncased-vocab.txt", "service/static/index.html",
                   "service/static/app.js", "service/static/style.css"):
        assert needed in names, needed
    for config in ("tasks.json", "bert_base_6layer_6conect.json", "detectron_config_x152.yaml"):
        assert any(n.endswith(f"/data/share/vilbert-serve/config/{config}") for n in names), config


def test_installed_wheel_works_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # The dependencies (torch, tokenizers, ...) come from this test's environment, appended after the
    # new venv's own site-packages, so the project itself is imported from the installed wheel.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    str(wheel)], check=True, capture_output=True)
    probe = """
import vilbert, vilbert.tasks, vilbert.predictor, vilbert.tokenization, service
from pathlib import Path
assert Path(vilbert.__file__).is_relative_to(SITE), vilbert.__file__
registry = vilbert.tasks.TaskRegistry.from_file()
assert len(registry) == 12
ids = vilbert.tokenization.Tokenizer(vilbert.tokenization.PACKAGED_VOCAB).encode("Hello, world!", 10).input_ids
assert list(ids[:5]) == [101, 7592, 1010, 2088, 999], ids
assert vilbert.predictor.PACKAGED_CONFIG.is_file()
assert (Path(service.__file__).parent / "static" / "index.html").is_file()
print("ok")
""".replace("SITE", repr(str(site)))
    result = subprocess.run([str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
