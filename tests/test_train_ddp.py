"""A two-process torchrun of train_tasks.py on CPU (gloo) completes, keeps both replicas identical and saves
one loadable checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from vilbert.checkpoint import load_model, read_state_dict
from vilbert.configuration import ViLBertConfig
from vilbert.tiny import write_tiny_vilbert
from vilbert_train import synthetic

ROOT = Path(__file__).resolve().parent.parent
DIM = 16


def test_two_process_torchrun_on_cpu(tmp_path):
    write_tiny_vilbert(tmp_path / "tiny", feature_dim=DIM)
    config = json.loads((tmp_path / "tiny" / "vilbert_config.json").read_text())
    config.update(attention_probs_dropout_prob=0.0, v_attention_probs_dropout_prob=0.0)
    (tmp_path / "tiny" / "train_config.json").write_text(json.dumps(config))
    synthetic.write_snli_ve(tmp_path / "datasets", DIM)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "train_tasks.py"), "--bert_model", "bert-base-uncased",
        "--from_pretrained", str(tmp_path / "tiny" / "multi_task_model.bin"),
        "--config_file", str(tmp_path / "tiny" / "train_config.json"), "--tasks", "13-12",
        "--lr_scheduler", "warmup_linear", "--train_iter_gap", "4", "--task_specific_tokens", "--save_name", "ddp",
        "--data_root", str(tmp_path / "datasets"), "--output_dir", str(tmp_path / "save"), "--num_workers", "0",
        "--batch_size", "8", "--num_train_epochs", "1", "--num_epoch", "1", "--device", "cpu",
    ]
    synthetic.write_nlvr2(tmp_path / "datasets", DIM)
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "save" / "VisualEntailment-NLVR2_train_config-ddp"
    rows = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    # 24 SNLI-VE examples / (batch 8 over 2 ranks = 4 per rank) -> 3 iterations; both tasks each iteration
    assert [(r["iteration"], r["task"]) for r in rows if "task" in r] == [
        (i, t) for i in range(3) for t in ("snli_ve", "nlvr2")]
    evals = [r for r in rows if "eval" in r]
    assert {r["eval"] for r in evals} == {"snli_ve", "nlvr2"}
    assert all(r["count"] in (6, 12) for r in evals)  # the whole dev split, summed over both ranks
    state = read_state_dict(folder / "pytorch_model_0.bin")
    load_model(state, ViLBertConfig.from_json_file(folder / "vilbert_config.json"), strict=True)
    start = read_state_dict(tmp_path / "tiny" / "multi_task_model.bin")
    assert not torch.equal(state["vil_tri_prediction.weight"], start["vil_tri_prediction.weight"])
    resume = torch.load(folder / "pytorch_ckpt_latest.tar", weights_only=True)
    assert resume["world_size"] == 2 and len(resume["rng"]["cpu"]) == 2
