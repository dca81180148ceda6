"""vilbert/checkpoint.py's loading paths on the tiny configuration (fast): the strict load's refusal naming each bad
key, the lenient load of fine-tuning (missing weights keep their initialisation and are logged, unused ones are
logged, mis-shaped ones refused), task embeddings switching task tokens on only when needed, a checkpoint without
its tied decoder, an unreadable file, and saving through a DataParallel wrapper. The numerics of a loaded model
against the reference are tests/test_vilbert_model.py."""

from __future__ import annotations

import logging
from collections import OrderedDict

import pytest
import torch

from vilbert.checkpoint import (TASK_EMBEDDINGS_KEY, TIED_DECODER_KEY, WORD_EMBEDDINGS_KEY, CheckpointError,
                                load_model, read_state_dict, save_checkpoint)
from vilbert.configuration import ViLBertConfig
from vilbert.modeling import ViLBertForVLTasks
from vilbert.tiny import tiny_config


def config(task_tokens: bool = True) -> ViLBertConfig:
    return ViLBertConfig.from_dict({**tiny_config().to_dict(), "task_specific_tokens": task_tokens})


@pytest.fixture(scope="module")
def state() -> "OrderedDict[str, torch.Tensor]":
    torch.manual_seed(0)
    model = ViLBertForVLTasks(config())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return OrderedDict((k, v.clone()) for k, v in model.state_dict().items())


def test_a_strict_load_names_every_missing_unexpected_and_misshaped_key(state):
    broken = OrderedDict(state)
    heads = [k for k in broken if k.startswith("vil_prediction.")]
    for key in heads:
        del broken[key]
    broken["extra.weight"] = torch.zeros(2)
    broken["bert.t_pooler.dense.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as refused:
        load_model(broken, config())
    expected_size = tuple(state["bert.t_pooler.dense.bias"].shape)
    assert str(refused.value) == (
        "checkpoint does not match the ViLBERT config:\n"
        f"  {len(heads)} missing key(s):\n    " + "\n    ".join(heads) + "\n"
        "  1 unexpected key(s):\n    extra.weight\n"
        f"  1 mis-shaped key(s):\n    bert.t_pooler.dense.bias: checkpoint (3,) vs model {expected_size}")


def test_a_lenient_load_keeps_fresh_weights_for_what_is_missing_and_logs_both_sides(state, caplog):
    missing = [k for k in state if not k.startswith(("bert.", "cls."))]  # every task head: more than ten keys
    partial = OrderedDict((k, v) for k, v in state.items() if k not in missing)
    partial.update({f"old_head_{i}.weight": torch.zeros(1) for i in range(12)})
    with caplog.at_level(logging.INFO, logger="vilbert.checkpoint"):
        model = load_model(partial, config(), strict=False)
    assert caplog.messages == [
        f"{len(missing)} weights not in the checkpoint keep their random init: " + ", ".join(missing[:10]),
        "12 checkpoint weights not used: " + ", ".join(f"old_head_{i}.weight" for i in range(10))]
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in partial.items() if k in loaded)
    assert not torch.equal(loaded[missing[0]], state[missing[0]])  # initialised afresh, not from the file
    assert len(missing) > 10 and not model.training and model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_a_lenient_load_of_a_complete_checkpoint_logs_nothing(state, caplog):
    with caplog.at_level(logging.INFO, logger="vilbert.checkpoint"):
        model = load_model(state, config(), strict=False)
    assert caplog.messages == [] and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_lenient_load_still_refuses_misshaped_weights(state):
    bad = OrderedDict(state)
    bad["bert.t_pooler.dense.bias"] = torch.zeros(3)
    bad["bert.t_pooler.dense.weight"] = torch.zeros(3, 3)
    bad["unrelated.bias"] = torch.zeros(3)  # unexpected, not mis-shaped
    with pytest.raises(CheckpointError) as refused:
        load_model(bad, config(), strict=False)
    assert str(refused.value) == "mis-shaped keys:\n  bert.t_pooler.dense.weight\n  bert.t_pooler.dense.bias"


def test_task_embeddings_in_the_file_switch_task_tokens_on_and_only_then_say_so(state, caplog):
    with caplog.at_level(logging.INFO, logger="vilbert.checkpoint"):
        switched = load_model(state, config(task_tokens=False))
    assert switched.config.task_specific_tokens
    assert caplog.messages == ["checkpoint has task embeddings: enabling task_specific_tokens"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vilbert.checkpoint"):
        load_model(state, config(task_tokens=True))  # already on: nothing to say
    assert caplog.messages == []
    plain = OrderedDict((k, v) for k, v in state.items() if k != TASK_EMBEDDINGS_KEY)
    assert not load_model(plain, config(task_tokens=False)).config.task_specific_tokens


def test_a_checkpoint_without_its_tied_decoder_gets_it_from_the_word_embeddings(state):
    untied = OrderedDict((k, v) for k, v in state.items() if k != TIED_DECODER_KEY)
    model = load_model(untied, config())
    assert torch.equal(model.cls.predictions.decoder.weight, state[WORD_EMBEDDINGS_KEY])
    assert TIED_DECODER_KEY not in untied  # the caller's mapping is not changed


@pytest.mark.parametrize("strict", [True, False])
def test_the_word_embeddings_win_over_a_decoder_copy_that_differs(state, strict):
    # Released checkpoints store the tied tensor twice with the same values; a file that disagrees must not
    # silently replace the word embeddings with its decoder copy.
    odd = OrderedDict(state)
    odd[TIED_DECODER_KEY] = state[WORD_EMBEDDINGS_KEY] + 1.0
    model = load_model(odd, config(), strict=strict)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, state[WORD_EMBEDDINGS_KEY])
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_an_unreadable_file_is_a_checkpoint_error_that_names_it(tmp_path):
    path = tmp_path / "multi_task_model.bin"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="multi_task_model.bin: cannot be read as a PyTorch checkpoint"):
        read_state_dict(path)
    with pytest.raises(FileNotFoundError) as missing:
        read_state_dict(tmp_path / "absent.bin")
    assert str(missing.value) == f"ViLBERT checkpoint not found: {tmp_path / 'absent.bin'}"


def test_saving_through_a_dataparallel_wrapper_writes_the_official_keys(state, tmp_path):
    model = load_model(state, config())
    path = tmp_path / "out.bin"
    save_checkpoint(torch.nn.DataParallel(model), path)
    saved = torch.load(path, weights_only=True)
    assert list(saved) == list(model.state_dict()) and not any(k.startswith("module.") for k in saved)
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]  # written atomically: no temporary file left


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")  # meta: nothing is copied
@pytest.mark.parametrize("strict", [True, False])
def test_the_model_is_built_on_the_device_asked_for(state, strict):
    # "meta" stands for an accelerator here (CI has none): the parameters must be created there, not on the CPU.
    model = load_model(state, config(), device="meta", strict=strict)
    assert {parameter.device.type for parameter in model.parameters()} == {"meta"}
