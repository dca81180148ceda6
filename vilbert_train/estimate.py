"""Per-task training cost of the full-size model, counted on the meta device (no weights, no data needed).

    python -m vilbert_train.estimate [--config config/bert_base_6layer_6conect.json]

For each task, with its reference batch size, sequence length and region count, one forward + backward of
ViLBertForVLTasks is traced on "meta" tensors: FLOPs come from torch's FlopCounterMode and activation memory from
the bytes of every tensor autograd saves for the backward pass. These are counts, not timings: docs/TRAINING.md
turns them into time estimates with a stated utilisation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from vilbert.configuration import ViLBertConfig
from vilbert.modeling import ViLBertForVLTasks

from .losses import compute_loss, forward
from .datasets import NUM_LABELS
from .specs import DETECTED_SLOTS, SPECS, TaskSpec

ROOT = Path(__file__).resolve().parent.parent


# Model rows per training example, where not one: NLVR2's two images, retrieval's four options.
ROWS_PER_EXAMPLE = {"score": 4, "binary": 2}
# The targets of a batch of each task kind: (spec, batch size) -> fields.
FAKE_TARGETS: dict[str, Callable[[TaskSpec, int], dict[str, torch.Tensor]]] = {
    "answer": lambda spec, batch: {"target": torch.zeros(batch, NUM_LABELS[spec.head])},
    "entailment": lambda spec, batch: {"target": torch.zeros(batch, 3)},
    "binary": lambda spec, batch: {"target": torch.zeros(batch, 2)},
    "grounding": lambda spec, batch: {"target": torch.zeros(batch, spec.max_region_num)},
    "pointing": lambda spec, batch: {
        "mc_ids": torch.zeros(batch, spec.max_region_num - DETECTED_SLOTS, dtype=torch.long),
        "mc_mask": torch.ones(batch, spec.max_region_num - DETECTED_SLOTS, dtype=torch.long),
        "target": torch.zeros(batch, spec.max_region_num - DETECTED_SLOTS)},
    "score": lambda spec, batch: {},
}


def fake_batch(spec: TaskSpec, batch: int, feature_dim: int) -> dict[str, torch.Tensor]:
    rows = ROWS_PER_EXAMPLE.get(spec.kind, 1)
    L, R = spec.max_seq_length, spec.max_region_num
    b = {
        "input_ids": torch.zeros(batch, rows, L, dtype=torch.long),
        "input_mask": torch.ones(batch, rows, L, dtype=torch.long),
        "segment_ids": torch.zeros(batch, rows, L, dtype=torch.long),
        "features": torch.zeros(batch, rows, R, feature_dim),
        "spatials": torch.zeros(batch, rows, R, 5),
        "image_mask": torch.ones(batch, rows, R, dtype=torch.long),
        "label": torch.zeros(batch, dtype=torch.long),
    }
    b.update(FAKE_TARGETS[spec.kind](spec, batch))
    return {k: v.to("meta") for k, v in b.items()}


def measure(model: ViLBertForVLTasks, spec: TaskSpec, batch: int) -> dict[str, float]:
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    data = fake_batch(spec, batch, model.config.v_feature_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = compute_loss(forward(model, data, spec), data, spec).loss
    forward_flops = counter.get_total_flops()
    with counter:  # entering the mode again restarts its count
        loss.backward()
    backward_flops = counter.get_total_flops()
    return {"flops_per_step": float(forward_flops + backward_flops), "forward_flops": float(forward_flops),
            "activation_bytes": float(saved[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "config" / "bert_base_6layer_6conect.json"))
    args = parser.parse_args()
    config = ViLBertConfig.from_dict({**ViLBertConfig.from_json_file(args.config).to_dict(), "task_specific_tokens": True,
                                      "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                                      "v_hidden_dropout_prob": 0.0, "v_attention_probs_dropout_prob": 0.0})
    with torch.device("meta"):
        model = ViLBertForVLTasks(config).train()
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"parameters": params}))
    for spec in SPECS.values():
        result = measure(model, spec, spec.batch_size)
        model.zero_grad(set_to_none=True)
        print(json.dumps({"task": spec.name, "task_id": spec.task_id, "batch": spec.batch_size, **result}))


if __name__ == "__main__":
    main()
