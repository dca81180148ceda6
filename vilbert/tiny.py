"""A tiny random-weight ViLBERT bundle in the released file formats, for tests and offline smoke runs.

Its answers are meaningless: the weights are random. Head sizes (3129 VQA, 1533 GQA answers) and the
vocabulary are the real ones, so every code path of the full model is exercised.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .answers import ANSWER_LISTS
from .checkpoint import save_checkpoint
from .configuration import ViLBertConfig
from .modeling import ViLBertForVLTasks
from .predictor import CHECKPOINT_FILE, CONFIG_FILE, VOCAB_FILE
from .tokenization import PACKAGED_VOCAB

TINY_NOTICE = "TINY RANDOM-WEIGHT TEST MODEL: its answers are meaningless."
# The weight matrices' spread. BERT's own init (0.02) leaves a model this narrow almost blind to its inputs: a
# different text moved its SNLI-VE probabilities by 1e-6, below every test's tolerance, so a test could not tell
# whether a batch mixed up two requests' texts. At 0.2 the same change moves them by about 0.03.
WEIGHT_STD = 0.2


def tiny_config(feature_dim: int = 64) -> ViLBertConfig:
    """Same structure as bert_base_6layer_6conect (interleaved schedule, task tokens), much narrower."""
    return ViLBertConfig.from_dict({
        "hidden_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 96,
        "v_feature_size": feature_dim, "v_hidden_size": 32, "v_num_hidden_layers": 3, "v_num_attention_heads": 4,
        "v_intermediate_size": 32, "bi_hidden_size": 32, "bi_num_attention_heads": 4,
        "v_biattention_id": [0, 1], "t_biattention_id": [2, 3], "max_position_embeddings": 512,
        "task_specific_tokens": True, "_notice": TINY_NOTICE,
    })


def write_tiny_vilbert(out_dir: str | os.PathLike, feature_dim: int = 64, seed: int = 0) -> None:
    """Write vilbert_config.json, multi_task_model.bin, vocab.txt and the answer lists into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = tiny_config(feature_dim)
    torch.manual_seed(seed)
    model = ViLBertForVLTasks(config)
    with torch.no_grad():  # weights that matter and non-trivial LayerNorm and bias values
        for name, param in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
            else:
                param.normal_(0.0, WEIGHT_STD)
    config.to_json_file(out_dir / CONFIG_FILE)
    save_checkpoint(model, out_dir / CHECKPOINT_FILE)
    shutil.copyfile(PACKAGED_VOCAB, out_dir / VOCAB_FILE)
    for name, (filename, size) in ANSWER_LISTS.items():
        answers = [f"untrained-{name}-answer-{i}" for i in range(size)]
        (out_dir / filename).write_text(json.dumps(answers), encoding="utf-8")
