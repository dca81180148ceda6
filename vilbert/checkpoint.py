"""Reading and writing ViLBERT checkpoints in the released format (a bare state dict saved with `torch.save`)."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import torch

from modelkit.checkpoint import MODULE_PREFIX, describe_key_problems, read_tensor_dict

from .configuration import ViLBertConfig
from .modeling import ViLBertForVLTasks

logger = logging.getLogger(__name__)

TIED_DECODER_KEY = "cls.predictions.decoder.weight"
WORD_EMBEDDINGS_KEY = "bert.embeddings.word_embeddings.weight"
TASK_EMBEDDINGS_KEY = "bert.embeddings.task_embeddings.weight"
# Containers other tools wrap a state dict in (our trainer's resume file uses the first).
STATE_DICT_CONTAINER_KEYS = ("model_state_dict", "state_dict", "model")


class CheckpointError(ValueError):
    """The file is not a ViLBERT checkpoint this model can load; the message names the offending keys."""


def normalise_keys(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """Strip a DataParallel/DDP `module.` prefix and rename TF-style LayerNorm `gamma`/`beta`."""
    normalised: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith(MODULE_PREFIX):
            key = key[len(MODULE_PREFIX):]
        if key.endswith(".gamma"):
            key = key[: -len("gamma")] + "weight"
        elif key.endswith(".beta"):
            key = key[: -len("beta")] + "bias"
        normalised[key] = value
    return normalised


def read_state_dict(path: str | os.PathLike) -> "OrderedDict[str, torch.Tensor]":
    """Load a checkpoint file safely (`weights_only=True`: no code in the file is executed)."""
    return normalise_keys(read_tensor_dict(path, "ViLBERT checkpoint", STATE_DICT_CONTAINER_KEYS, CheckpointError))


def describe_mismatch(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str:
    """A readable list of missing, unexpected and mis-shaped keys ('' when the checkpoint fits exactly)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    return describe_key_problems((("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)))


def build_model(config: ViLBertConfig, device: str | torch.device) -> ViLBertForVLTasks:
    """Allocate a model without spending time on random initialisation (its weights are about to be loaded)."""
    with torch.device("meta"):
        model = ViLBertForVLTasks(config)
    model = model.to_empty(device=device)
    # to_empty gives each parameter its own storage; re-tie the MLM decoder to the word embeddings.
    model.cls.predictions.decoder.weight = model.bert.embeddings.word_embeddings.weight
    return model


def load_model(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    config: ViLBertConfig,
    device: str | torch.device = "cpu",
    strict: bool = True,
) -> ViLBertForVLTasks:
    """Build a ViLBertForVLTasks and load a released (or our own) checkpoint into it, in eval mode.

    A checkpoint with task embeddings switches `task_specific_tokens` on, as the reference's
    `--task_specific_tokens` flag does for the released model. With `strict=False` (fine-tuning from the
    pre-trained model, whose task heads are absent) missing keys keep a fresh random initialisation."""
    state_dict = checkpoint if isinstance(checkpoint, Mapping) else read_state_dict(checkpoint)
    state_dict = normalise_keys(state_dict)
    if TASK_EMBEDDINGS_KEY in state_dict and not config.task_specific_tokens:
        logger.info("checkpoint has task embeddings: enabling task_specific_tokens")
        config = ViLBertConfig.from_dict({**config.to_dict(), "task_specific_tokens": True})
    if WORD_EMBEDDINGS_KEY in state_dict:
        # The MLM decoder is tied to the word embeddings (one tensor). A file's own copy of the decoder is the same
        # values in the released checkpoints; where it differs, or is absent, the word embeddings decide, rather
        # than whichever of the two keys happened to be loaded last.
        state_dict[TIED_DECODER_KEY] = state_dict[WORD_EMBEDDINGS_KEY]

    if strict:
        model = build_model(config, device)
        problems = describe_mismatch(model, state_dict)
        if problems:
            raise CheckpointError(f"checkpoint does not match the ViLBERT config:\n{problems}")
        model.load_state_dict(state_dict, strict=True)
    else:
        model = ViLBertForVLTasks(config).to(device)
        expected = model.state_dict()
        misshaped = [k for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
        if misshaped:
            raise CheckpointError("mis-shaped keys:\n  " + "\n  ".join(misshaped))
        result = model.load_state_dict(state_dict, strict=False)
        if result.missing_keys:
            logger.warning("%d weights not in the checkpoint keep their random init: %s",
                           len(result.missing_keys), ", ".join(result.missing_keys[:10]))
        if result.unexpected_keys:
            logger.warning("%d checkpoint weights not used: %s",
                           len(result.unexpected_keys), ", ".join(result.unexpected_keys[:10]))
    model.cls.predictions.decoder.weight = model.bert.embeddings.word_embeddings.weight
    return model.eval()


def save_checkpoint(model: ViLBertForVLTasks, path: str | os.PathLike) -> None:
    """Write the released format: a bare state dict with the official key names, atomically."""
    if hasattr(model, "module"):  # DataParallel / DDP wrapper
        model = model.module
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
