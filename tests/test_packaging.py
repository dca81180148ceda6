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


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> tuple[Path, Path]:
    """(python, site-packages) of a fresh venv with only the wheel installed (no checkout on its path)."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # The dependencies (torch, tokenizers, ...) come from this test's environment, appended after the
    # new venv's own site-packages, so the project itself is imported from the installed wheel.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    str(wheel)], check=True, capture_output=True)
    return python, site


def run_probe(installed: tuple[Path, Path], probe: str, cwd: Path) -> None:
    python, site = installed
    result = subprocess.run([str(python), "-c", probe.replace("SITE", repr(str(site)))], cwd=cwd,
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr


def test_installed_wheel_works_outside_the_checkout(installed, tmp_path):
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
"""
    run_probe(installed, probe, tmp_path)


def test_installed_trainer_takes_a_step_on_official_pickles(installed, tmp_path):
    """The packaged trainer reads the official pickles (VQA targets, the label2ans answer list) and trains,
    from outside the checkout: nothing it imports lives in an unpackaged folder such as models/."""
    probe = """
import json, shutil, sys
from pathlib import Path
import torch
from torch.utils.data import default_collate
import vilbert_train
assert Path(vilbert_train.__file__).is_relative_to(SITE), vilbert_train.__file__
from vilbert.checkpoint import load_model
from vilbert.configuration import ViLBertConfig
from vilbert.tiny import write_tiny_vilbert
from vilbert.tokenization import Tokenizer
from vilbert_train import synthetic
from vilbert_train.datasets import TaskDataset
from vilbert_train.engine import write_bundle_extras
from vilbert_train.evaluation import load_answers
from vilbert_train.losses import compute_loss, forward
from vilbert_train.specs import SPECS

torch.manual_seed(0)
torch.set_num_threads(1)
work = Path.cwd()
write_tiny_vilbert(work / "tiny", feature_dim=16)
synthetic.write_vqa(work / "datasets", 16)
spec = SPECS[1]
answers = load_answers(spec, None, work / "datasets")  # VQA/cache/trainval_label2ans.pkl
assert answers and all(isinstance(a, str) for a in answers), answers
dataset = TaskDataset(spec, "train", work / "datasets", Tokenizer())  # VQA/cache/train_target.pkl
config = ViLBertConfig.from_json_file(work / "tiny" / "vilbert_config.json")
model = load_model(work / "tiny" / "multi_task_model.bin", config).train()
batch = {k: torch.as_tensor(v) for k, v in default_collate([dataset[i] for i in range(4)]).items()}
head = model.vil_prediction.logit_fc[3].weight
before = head.detach().clone()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
loss = compute_loss(forward(model, batch, spec), batch, spec).loss
loss.backward()
optimizer.step()
assert torch.isfinite(loss) and not torch.equal(before, head), float(loss)
# A bundle started from a checkpoint without answer lists converts them from the dataset's pickle.
(work / "start").mkdir()
shutil.copy(work / "tiny" / "multi_task_model.bin", work / "start")
(work / "bundle").mkdir()
write_bundle_extras(work / "bundle", config, work / "tiny" / "vocab.txt", work / "start" / "multi_task_model.bin",
                    work / "datasets")
assert json.loads((work / "bundle" / "vqa_answers.json").read_text()) == answers
print("ok")
"""
    run_probe(installed, probe, tmp_path)
