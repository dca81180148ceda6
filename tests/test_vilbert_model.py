"""ViLBERT model: exact checkpoint keys, strict loading, and numerical identity with the reference forward."""

from __future__ import annotations

import json
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from reference_forward import reference_forward
from vilbert import CheckpointError, ViLBertConfig, ViLBertForVLTasks, load_model, read_state_dict, save_checkpoint
from vilbert.checkpoint import normalise_keys

DATA = Path(__file__).parent / "data"
OFFICIAL_CONFIG = Path(__file__).parent.parent / "config" / "bert_base_6layer_6conect.json"


def small_config(**overrides) -> ViLBertConfig:
    values = dict(
        vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        v_feature_size=24, v_hidden_size=16, v_num_hidden_layers=3, v_num_attention_heads=2, v_intermediate_size=20,
        bi_hidden_size=24, bi_num_attention_heads=4, v_biattention_id=[0, 1], t_biattention_id=[2, 3],
        max_position_embeddings=64, task_specific_tokens=True,
    )
    values.update(overrides)
    return ViLBertConfig.from_dict(values)


def perturbed_model(config: ViLBertConfig, seed: int = 0) -> ViLBertForVLTasks:
    """Random weights with non-trivial LayerNorm and bias values, so that every parameter matters."""
    torch.manual_seed(seed)
    model = ViLBertForVLTasks(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def random_inputs(config: ViLBertConfig, batch: int, length: int, regions: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, config.vocab_size, (batch, length), generator=g)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    image_mask = torch.ones(batch, regions, dtype=torch.long)
    if batch > 1:  # padding in some rows
        attention_mask[1, length - 3:] = 0
        input_ids[1, length - 3:] = 0
        image_mask[-1, regions - 2:] = 0
    return dict(
        input_ids=input_ids,
        features=torch.randn(batch, regions, config.v_feature_size, generator=g),
        spatials=torch.rand(batch, regions, 5, generator=g),
        token_type_ids=torch.zeros(batch, length, dtype=torch.long),
        attention_mask=attention_mask,
        image_attention_mask=image_mask,
        task_ids=torch.randint(1, 20, (batch, 1), generator=g),
    )


HEADS = ["vil_prediction", "vil_prediction_gqa", "vil_logit", "vil_tri_prediction", "vision_logit", "linguisic_logit"]


def assert_close_relative(ours: torch.Tensor, ref: torch.Tensor, name: str, rel: float = 1e-4) -> None:
    """Largest difference within `rel` of the output's scale. Masked regions (-10000) are checked on their own so
    that their magnitude does not loosen the check of the real ones."""
    real = ref > -5000
    for part in (real, ~real):
        if part.any():
            scale = ref[part].abs().max().clamp_min(1e-6)
            error = (ours[part] - ref[part]).abs().max()
            assert error <= rel * scale, f"{name}: max error {error:.3g} vs scale {scale:.3g}"


def assert_matches_reference(model, inputs, rel=1e-4):
    with torch.inference_mode():
        pairs = inputs["input_ids"].shape[0] % 2 == 0
        ours = model(**inputs, output_pretraining_heads=True, pairs=pairs)
        ref = reference_forward({k: v.float() for k, v in model.state_dict().items()}, model.config.to_dict(), **inputs)
    names = HEADS + ["linguisic_prediction", "vision_prediction"]
    if pairs:
        names.append("vil_binary_prediction")
    for name in names:
        assert getattr(ours, name).shape == ref[name].shape, name
        assert_close_relative(getattr(ours, name), ref[name], name, rel)


# ------------------------------------------------------------------------------------------------------------


def test_official_config_reads_every_key():
    config = ViLBertConfig.from_json_file(OFFICIAL_CONFIG)
    raw = json.loads(OFFICIAL_CONFIG.read_text())
    assert config.v_biattention_id == [0, 1, 2, 3, 4, 5] and config.t_biattention_id == [6, 7, 8, 9, 10, 11]
    assert (config.hidden_size, config.v_hidden_size, config.bi_hidden_size) == (768, 1024, 1024)
    # keys the model never reads are kept, absent keys take the reference defaults
    assert config.extra == {"bi_intermediate_size": 1024, "bi_attention_type": 1, "pooling_method": "mul"}
    assert config.fusion_method == "mul" and config.task_specific_tokens is False
    assert {k: v for k, v in config.to_dict().items() if k in raw} == raw


def test_config_rejects_impossible_schedules(tmp_path):
    with pytest.raises(ValueError, match="same length"):
        small_config(v_biattention_id=[0], t_biattention_id=[1, 2])
    with pytest.raises(ValueError, match="text layer"):
        small_config(t_biattention_id=[2, 9])
    bad = tmp_path / "c.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        ViLBertConfig.from_json_file(bad)


def test_full_size_state_dict_matches_released_keys_and_shapes():
    reference = json.loads((DATA / "vilbert_state_dict.json").read_text())
    config = ViLBertConfig.from_dict({**ViLBertConfig.from_json_file(OFFICIAL_CONFIG).to_dict(), "task_specific_tokens": True})
    with torch.device("meta"):
        model = ViLBertForVLTasks(config)
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert len(ours) == 560
    assert sorted(ours) == sorted(reference)
    # the MLM decoder is the word-embedding matrix itself, so unique parameters are one matrix fewer
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == 268_028_859


def test_checkpoint_round_trip_with_module_prefix_loads_strictly(tmp_path):
    config = small_config()
    model = perturbed_model(config)
    wrapped = OrderedDict(("module." + k, v) for k, v in model.state_dict().items())
    path = tmp_path / "pytorch_model_9.bin"
    torch.save(wrapped, path)
    loaded = load_model(path, small_config(task_specific_tokens=False))  # task tokens detected from the file
    assert loaded.config.task_specific_tokens
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    assert not loaded.training


def test_save_checkpoint_writes_bare_state_dict_with_official_keys(tmp_path):
    model = perturbed_model(small_config())
    save_checkpoint(model, tmp_path / "m.bin")
    raw = torch.load(tmp_path / "m.bin", weights_only=True)
    assert list(raw) == list(model.state_dict())
    inputs = random_inputs(model.config, 2, 7, 5)
    with torch.inference_mode():
        before = model(**inputs).vil_prediction
        after = load_model(tmp_path / "m.bin", model.config)(**inputs).vil_prediction
    assert torch.equal(before, after)


def test_gamma_beta_and_missing_tied_decoder_are_accepted():
    model = perturbed_model(small_config())
    state = OrderedDict()
    for key, value in model.state_dict().items():
        if key == "cls.predictions.decoder.weight":
            continue  # 559-key variant: the tied matrix saved once
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        state[key] = value
    loaded = load_model(state, model.config)
    assert torch.equal(loaded.bert.embeddings.LayerNorm.weight, model.bert.embeddings.LayerNorm.weight)
    assert normalise_keys({"module.a.gamma": torch.zeros(1)}).keys() == {"a.weight"}


def test_mismatched_checkpoint_names_missing_unexpected_and_misshaped_keys():
    model = perturbed_model(small_config())
    state = OrderedDict(model.state_dict())
    del state["vil_logit.bias"]
    state["vil_extra.weight"] = torch.zeros(3)
    state["vil_tri_prediction.weight"] = torch.zeros(4, 24)
    with pytest.raises(CheckpointError) as err:
        load_model(state, model.config)
    message = str(err.value)
    assert "1 missing key(s)" in message and "vil_logit.bias" in message
    assert "1 unexpected key(s)" in message and "vil_extra.weight" in message
    assert "vil_tri_prediction.weight: checkpoint (4, 24) vs model (3, 24)" in message


def test_checkpoint_with_code_is_refused_not_executed(tmp_path):
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.bin"
    with open(path, "wb") as f:
        pickle.dump({"bert.x": Exploit()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(path)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "absent.bin")


@pytest.mark.parametrize("batch", [2, 3])
def test_forward_matches_reference_small(batch):
    model = perturbed_model(small_config())
    assert_matches_reference(model, random_inputs(model.config, batch, length=9, regions=7))


def test_forward_matches_reference_other_schedule():
    # schedule where co-attention starts late on both streams and the final self layers are several
    config = small_config(num_hidden_layers=5, v_num_hidden_layers=4, v_biattention_id=[1, 2], t_biattention_id=[1, 3])
    model = perturbed_model(config, seed=3)
    assert_matches_reference(model, random_inputs(config, 2, length=6, regions=5))


@pytest.mark.slow
def test_full_size_forward_matches_reference():
    config = ViLBertConfig.from_dict({**ViLBertConfig.from_json_file(OFFICIAL_CONFIG).to_dict(), "task_specific_tokens": True})
    model = perturbed_model(config, seed=5)
    assert_matches_reference(model, random_inputs(config, 2, length=12, regions=11))


def test_pretraining_heads_only_when_asked():
    model = perturbed_model(small_config())
    with torch.inference_mode():
        out = model(**random_inputs(model.config, 2, 7, 5))
    assert out.linguisic_prediction is None and out.vision_prediction is None and out.seq_relationship is None


def test_padding_never_changes_real_rows():
    model = perturbed_model(small_config())
    inputs = random_inputs(model.config, 1, length=7, regions=5)
    padded = dict(inputs)
    padded["input_ids"] = torch.cat([inputs["input_ids"], torch.randint(1, 100, (1, 4))], 1)  # junk ids, masked
    padded["token_type_ids"] = torch.zeros_like(padded["input_ids"])
    padded["attention_mask"] = torch.cat([inputs["attention_mask"], torch.zeros(1, 4, dtype=torch.long)], 1)
    padded["features"] = torch.cat([inputs["features"], torch.randn(1, 3, 24) * 5], 1)
    padded["spatials"] = torch.cat([inputs["spatials"], torch.rand(1, 3, 5)], 1)
    padded["image_attention_mask"] = torch.cat([inputs["image_attention_mask"], torch.zeros(1, 3, dtype=torch.long)], 1)
    with torch.inference_mode():
        a, b = model(**inputs), model(**padded)
    for name in ["vil_prediction", "vil_prediction_gqa", "vil_logit", "vil_tri_prediction"]:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.vision_logit, b.vision_logit[:, :5], rtol=1e-5, atol=1e-6)
    assert torch.all(b.vision_logit[:, 5:] < -9000)  # padded regions are masked out of any ranking


def test_batch_equals_single():
    model = perturbed_model(small_config())
    inputs = random_inputs(model.config, 4, length=8, regions=6)
    with torch.inference_mode():
        batched = model(**inputs)
        for i in range(4):
            single = model(**{k: v[i:i + 1] for k, v in inputs.items()})
            for name in HEADS:
                torch.testing.assert_close(getattr(single, name)[0], getattr(batched, name)[i], rtol=1e-5, atol=1e-6)


def test_task_token_changes_the_answer_and_nlvr2_pairs_rows():
    model = perturbed_model(small_config())
    inputs = random_inputs(model.config, 2, length=8, regions=6)
    other = dict(inputs, task_ids=inputs["task_ids"] % 19 + 1)
    with torch.inference_mode():
        a, b = model(**inputs, pairs=True), model(**other)
        assert not torch.allclose(a.vil_prediction, b.vil_prediction)
        pair = model.pair_prediction(a.pooled_output)
    assert pair.shape == (1, 2)
    torch.testing.assert_close(pair, a.vil_binary_prediction)
    # the pair head runs only when asked for: an even batch of unrelated rows is not paired
    assert b.vil_binary_prediction is None
    with pytest.raises(ValueError, match="even number"):
        model.pair_prediction(a.pooled_output[:1])


@pytest.mark.skipif(not __import__("vilbert.cpu_inference").cpu_inference.onednn_linear_available(),
                    reason="this PyTorch build has no oneDNN linear ops")
def test_packed_cpu_weights_give_the_same_outputs():
    import copy

    from vilbert.cpu_inference import PackedLinear, pack_linear_weights

    model = perturbed_model(small_config())
    packed = copy.deepcopy(model)
    count = pack_linear_weights(packed)
    # every Linear but the tied decoder and the three single-output heads
    assert count == sum(1 for m in model.modules() if type(m) is torch.nn.Linear and m.out_features > 1) - 1
    assert not isinstance(packed.cls.predictions.decoder, PackedLinear)
    inputs = random_inputs(model.config, 2, 8, 6)
    with torch.inference_mode():
        heads = dict(output_pretraining_heads=True, pairs=True)
        a, b = model(**inputs, **heads), packed(**inputs, **heads)
    for name in HEADS + ["vil_binary_prediction", "linguisic_prediction", "vision_prediction"]:
        assert_close_relative(getattr(b, name), getattr(a, name), name, rel=1e-5)


@pytest.mark.skipif(not __import__("vilbert.cpu_inference").cpu_inference.onednn_linear_available(),
                    reason="this PyTorch build has no oneDNN linear ops")
def test_packed_linear_row_threshold_picks_the_kernel_and_both_agree(monkeypatch):
    from vilbert import cpu_inference
    from vilbert.cpu_inference import PackedLinear

    linear = torch.nn.Linear(16, 24)
    short, long = torch.randn(2, 3, 16), torch.randn(4, 5, 16)  # 6 and 20 rows
    limited = PackedLinear(linear, max_packed_rows=8)
    with torch.inference_mode():
        expected = [linear(short), linear(long)]
    calls, default_linear = [], torch.nn.functional.linear
    monkeypatch.setattr(cpu_inference.F, "linear", lambda *a: calls.append(a[0].shape) or default_linear(*a))
    with torch.inference_mode():
        for x, want in zip((short, long), expected):
            assert_close_relative(limited(x), want, "packed", rel=1e-6)
    assert calls == [long.shape]  # only the input over the limit took the default kernel

    expected_long = expected[1]
    for capability, expected in (("AVX512", None), ("AVX2", cpu_inference.AVX2_MAX_PACKED_ROWS)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert cpu_inference.default_max_packed_rows() == expected
        packed = PackedLinear(linear)
        assert packed.max_packed_rows == expected
        # without a fallback kernel the plain weight is not kept (it would be a second copy of every matrix)
        assert (packed.weight is None) == (expected is None)
        with torch.inference_mode():
            assert_close_relative(packed(long), expected_long, "packed", rel=1e-6)


@pytest.mark.skipif(not __import__("vilbert.cpu_inference").cpu_inference.native_bf16_linear_available(),
                    reason="this CPU has no native bf16 instructions")
def test_bf16_packed_linear_matches_autocast():
    from vilbert.cpu_inference import PackedLinear

    linear = torch.nn.Linear(64, 96)
    x = torch.randn(3, 40, 64)
    packed = PackedLinear(linear, dtype=torch.bfloat16, max_packed_rows=8)
    assert packed.max_packed_rows is None and packed.weight is None  # bf16 is always packed
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = linear(x)
        got = packed(x)
    exact = torch.nn.functional.linear(x, linear.weight, linear.bias)
    assert got.dtype == want.dtype == torch.bfloat16
    # the same bf16 rounding of inputs and weights as autocast; both within bf16 precision of fp32
    assert_close_relative(got.float(), want.float(), "packed vs autocast", rel=1e-2)
    assert_close_relative(got.float(), exact, "packed vs fp32", rel=2e-2)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        PackedLinear(linear, dtype=torch.float16)
