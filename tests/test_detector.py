"""Detector: checkpoint keys, loading, preprocessing, exact region selection, and extraction on real photos."""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from detector import RegionFeatureExtractor
from detector.config import DetectorConfigError, config_from_dict, load_config
from detector.extractor import PIXEL_MEANS_BGR, pad_to_multiple, preprocess
from detector.images import ImageDecodeError, load_image
from detector.model import DetectorCheckpointError, RegionDetector, load_detector_state, read_checkpoint
from detector.rpn import legacy_cell_anchors
from detector.selection import max_confidence, max_confidence_loop, select_regions
from detector.tiny import tiny_detector_config, write_tiny_detector

DATA = Path(__file__).parent / "data"
X152_CONFIG = Path(__file__).parent.parent / "config" / "detectron_config_x152.yaml"
ATTRIBUTE_KEYS = ("roi_heads.box.predictor.cls_embed", "roi_heads.box.predictor.attr_linear")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return write_tiny_detector(tmp_path_factory.mktemp("det"))


@pytest.fixture(scope="module")
def extractor(tiny_files) -> RegionFeatureExtractor:
    return RegionFeatureExtractor.from_files(*tiny_files)


# ------------------------------------------------------------------------------------------------ config / keys


def test_x152_config_builds_with_the_released_keys_and_shapes():
    config = load_config(X152_CONFIG)
    assert (config.conv_body, config.num_groups, config.width_per_group, config.out_channels) == ("R-152-FPN", 32, 8, 512)
    assert config.anchor_stride == (4, 8, 16, 32, 64) and config.pooler_scales == (0.25, 0.125, 0.0625, 0.03125)
    with torch.device("meta"):
        model = RegionDetector(config)
    ours = sorted([k, list(v.shape)] for k, v in model.state_dict().items())
    reference = sorted(json.loads((DATA / "detector_state_dict.json").read_text()))
    assert len(ours) == 815 and ours == reference
    raw = _raw(X152_CONFIG)
    raw["MODEL"]["ROI_BOX_HEAD"]["ATTR"] = False
    with torch.device("meta"):
        plain = RegionDetector(config_from_dict(raw))
    assert len(plain.state_dict()) == 810  # ATTR False drops exactly the 5 attribute keys


def _raw(path):
    import yaml

    return yaml.safe_load(path.read_text())


def test_legacy_anchors_match_the_fork():
    np.testing.assert_array_equal(legacy_cell_anchors(4, 32, (0.5, 1.0, 2.0)),
                                  [[-22, -10, 25, 13], [-14, -14, 17, 17], [-10, -22, 13, 25]])
    np.testing.assert_array_equal(legacy_cell_anchors(64, 512, (0.5, 1.0, 2.0)),
                                  [[-332, -152, 395, 215], [-224, -224, 287, 287], [-148, -328, 211, 391]])


def test_unsupported_architectures_are_clear_errors():
    with pytest.raises(DetectorConfigError, match="CONV_BODY 'R-50-C4' is not supported"):
        config_from_dict({"MODEL": {"BACKBONE": {"CONV_BODY": "R-50-C4"}}})
    with pytest.raises(DetectorConfigError, match="only FPN"):
        config_from_dict({"MODEL": {"BACKBONE": {"CONV_BODY": "R-50-FPN"}}})
    with pytest.raises(DetectorConfigError, match="ANCHOR_STRIDE"):
        config_from_dict({"MODEL": {"RPN": {"ANCHOR_STRIDE": "(4, 8"}}})


# ------------------------------------------------------------------------------------------------ checkpoint


@pytest.mark.parametrize("prefix_module", [False, True])
def test_tiny_checkpoint_round_trips(tmp_path, prefix_module):
    config_path, checkpoint_path = write_tiny_detector(tmp_path, prefix_module=prefix_module)
    raw = torch.load(checkpoint_path, weights_only=True)
    assert set(raw) == {"model", "iteration"}
    assert all(k.startswith("module.") for k in raw["model"]) == prefix_module
    model = RegionDetector(load_config(config_path))
    load_detector_state(model, read_checkpoint(checkpoint_path))
    for key, value in model.state_dict().items():
        stored = raw["model"][("module." if prefix_module else "") + key]
        assert torch.equal(value, stored), key


def test_checkpoint_without_attribute_head_loads_and_missing_keys_are_named(tmp_path, tiny_files):
    state = read_checkpoint(tiny_files[1])
    slim = OrderedDict((k, v) for k, v in state.items() if not k.startswith(ATTRIBUTE_KEYS))
    model = RegionDetector(tiny_detector_config())
    load_detector_state(model, slim)  # attribute head is optional
    broken = OrderedDict(slim)
    del broken["roi_heads.box.feature_extractor.fc6.weight"]
    broken["backbone.fpn.fpn_layer1.bias"] = torch.zeros(3)
    with pytest.raises(DetectorCheckpointError) as err:
        load_detector_state(RegionDetector(tiny_detector_config()), broken)
    assert "fc6.weight" in str(err.value) and "backbone.fpn.fpn_layer1.bias: checkpoint (3,)" in str(err.value)


def test_checkpoint_with_code_is_refused(tmp_path):
    import pickle

    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": {"x": Exploit()}}, f, protocol=2)
    with pytest.raises(DetectorCheckpointError, match="weights_only"):
        read_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ preprocessing


def test_preprocessing_matches_a_direct_opencv_computation():
    image = data.astronaut()  # 512 x 512
    resized, scale = preprocess(image, 800, 1333)
    assert scale == pytest.approx(800 / 512)
    bgr = np.array(image).astype(np.float32)[:, :, ::-1]
    bgr -= np.array([[[102.9801, 115.9465, 122.7717]]])
    direct = cv2.resize(bgr, None, fx=800 / 512, fy=800 / 512, interpolation=cv2.INTER_LINEAR)
    assert resized.dtype == np.float32
    np.testing.assert_array_equal(resized, direct)
    wide = np.zeros((300, 1000, 3), np.uint8)
    resized, scale = preprocess(wide)
    assert scale == pytest.approx(1333 / 1000) and resized.shape[:2] == (400, 1333)
    padded = pad_to_multiple(resized)
    assert padded.shape == (3, 416, 1344) and np.all(padded[:, 400:, :] == 0) and np.all(padded[:, :, 1333:] == 0)
    np.testing.assert_array_equal(PIXEL_MEANS_BGR, [102.9801, 115.9465, 122.7717])


def _encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def test_image_modes_are_converted_sensibly():
    rgb = data.astronaut()
    gray = load_image(_encode(Image.fromarray(rgb).convert("L")))
    assert gray.shape == (512, 512, 3) and np.array_equal(gray[..., 0], gray[..., 2])
    palette = load_image(_encode(Image.fromarray(rgb).convert("P")))
    assert palette.shape == (512, 512, 3) and palette.std() > 20  # colours, not palette indices
    rgba = Image.fromarray(rgb).convert("RGBA")
    rgba.putalpha(0)
    assert load_image(_encode(rgba)).max() == 0  # fully transparent -> black
    deep = Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16))
    decoded = load_image(_encode(deep))
    assert decoded.dtype == np.uint8 and decoded.max() > 200
    assert load_image(rgb[:, :, 0]).shape == (512, 512, 3)


def test_exif_orientation_is_applied():
    image = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    assert load_image(_encode(image, "JPEG", exif=exif)).shape == (40, 20, 3)


def test_bad_images_are_refused_with_codes():
    with pytest.raises(ImageDecodeError) as err:
        load_image(b"this is not an image")
    assert err.value.code == "invalid_image"
    with pytest.raises(ImageDecodeError) as err:
        load_image(_encode(Image.new("L", (5000, 5000))), max_pixels=1_000_000)
    assert err.value.code == "image_too_large"
    truncated = _encode(Image.fromarray(data.astronaut()), "JPEG")[:2000]
    with pytest.raises(ImageDecodeError):
        load_image(truncated)
    with pytest.raises(ImageDecodeError) as err:
        load_image(b"")
    assert err.value.code == "empty_image"


# ------------------------------------------------------------------------------------------------ selection


@pytest.mark.parametrize("seed,temperature", [(0, 0.5), (1, 2.0), (2, 8.0)])
def test_vectorised_selection_equals_the_per_class_loop(seed, temperature):
    g = torch.Generator().manual_seed(seed)
    count = 300
    corner = torch.rand(count, 2, generator=g) * 400
    boxes = torch.cat([corner, corner + torch.rand(count, 2, generator=g) * 150 + 3], 1)
    probs = torch.softmax(torch.randn(count, 1601, generator=g) * temperature, 1)
    loop = max_confidence_loop(boxes, probs)
    assert torch.equal(max_confidence(boxes, probs), loop)
    keep, confidence = select_regions(boxes, probs, 100)
    expected = loop.sort(descending=True, stable=True).indices[:100]
    assert torch.equal(keep, expected) and torch.equal(confidence, loop[expected])


# ------------------------------------------------------------------------------------------------ extraction


PHOTOS = {"astronaut": data.astronaut, "coffee": data.coffee, "chelsea": data.chelsea}


@pytest.mark.parametrize("name", list(PHOTOS))
def test_extraction_on_real_photographs(extractor, name):
    image = PHOTOS[name]()
    result = extractor.extract([image])[0]
    height, width = image.shape[:2]
    assert (result.image_width, result.image_height) == (width, height)
    assert result.boxes.shape == (100, 4) and result.features.shape == (100, extractor.feature_dim)
    assert len({tuple(b) for b in np.round(result.boxes, 3).tolist()}) == 100
    _, scale = preprocess(image)
    canvas = pad_to_multiple(np.zeros((round(height * scale), round(width * scale), 1), np.float32)).shape
    assert result.boxes.min() >= 0
    assert np.all(result.boxes[:, 2] <= (canvas[2] - 1) / scale + 1e-3) and np.all(result.boxes[:, 3] <= (canvas[1] - 1) / scale + 1e-3)
    assert np.all(result.boxes[:, 2] >= result.boxes[:, 0]) and np.all(result.boxes[:, 3] >= result.boxes[:, 1])
    assert result.features.min() >= 0 and result.features.dtype == np.float32
    assert np.all(np.diff(result.scores) <= 0) and np.all((result.class_ids >= 1) & (result.class_ids <= 1600))


def test_extraction_is_deterministic_and_batch_independent(extractor):
    images = [data.astronaut(), data.coffee()]
    alone = [extractor.extract([image])[0] for image in images]
    batch = extractor.extract(images)
    again = extractor.extract([images[1]])[0]
    for a, b in zip(alone, batch):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(alone[1].features, again.features)


def test_features_of_given_boxes(extractor):
    image = data.coffee()
    boxes = np.array([[10, 20, 200, 220], [0, 0, image.shape[1] - 1, image.shape[0] - 1]], np.float32)
    result = extractor.extract_boxes(image, boxes)
    assert result.features.shape == (2, extractor.feature_dim) and result.num_boxes == 2
    np.testing.assert_array_equal(result.boxes, boxes)
    detected = extractor.extract([image])[0]
    again = extractor.extract_boxes(image, detected.boxes[:5])
    np.testing.assert_allclose(again.features, detected.features[:5], rtol=1e-4, atol=1e-5)


def test_identity_changes_with_sizes(tiny_files):
    a = RegionFeatureExtractor.from_files(*tiny_files)
    b = RegionFeatureExtractor.from_files(*tiny_files, min_size=600)
    assert a.identity != b.identity and a.identity == RegionFeatureExtractor.from_files(*tiny_files).identity


def test_precision_options(tiny_files):
    """channels-last changes only the summation order; bf16 stays close on the same boxes (drift figures for the
    X-152 are in docs/PERFORMANCE.md, from bench/drift_detector.py); bad values are clear errors."""
    image = data.coffee()
    fp32 = RegionFeatureExtractor.from_files(*tiny_files, channels_last=False)
    assert RegionFeatureExtractor.from_files(*tiny_files).channels_last  # the CPU default
    boxes = fp32.extract([image])[0].boxes[:20]
    reference = fp32.extract_boxes(image, boxes).features
    channels_last = RegionFeatureExtractor.from_files(*tiny_files, channels_last=True)
    np.testing.assert_allclose(channels_last.extract_boxes(image, boxes).features, reference, rtol=1e-4, atol=1e-4)
    assert channels_last.identity == fp32.identity
    bf16 = RegionFeatureExtractor.from_files(*tiny_files, precision="bf16", channels_last=False)
    features = bf16.extract_boxes(image, boxes).features
    assert features.dtype == np.float32
    cosine = (features * reference).sum(1) / (np.linalg.norm(features, axis=1) * np.linalg.norm(reference, axis=1))
    assert cosine.min() > 0.99
    assert not np.array_equal(features, reference)  # autocast really ran
    assert bf16.identity != fp32.identity  # cached fp32 features are never served for bf16
    with pytest.raises(ValueError, match="precision"):
        RegionFeatureExtractor.from_files(*tiny_files, precision="int8")


def test_folding_the_frozen_batch_norms_keeps_the_result(tiny_files):
    """The served model folds each frozen batch norm into its convolution: same features up to rounding."""
    from detector.config import load_config
    from detector.fusion import fold_frozen_batchnorm
    from detector.model import RegionDetector, load_detector_state, read_checkpoint

    model = RegionDetector(load_config(tiny_files[0])).eval()
    load_detector_state(model, read_checkpoint(tiny_files[1]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # batch norms far from identity, so a wrong fold cannot pass
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=generator) * 2 + 0.25)
            elif name.endswith(("running_mean", "bn1.bias", "bn2.bias", "bn3.bias")):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.2)
    image = torch.randn(1, 3, 224, 320, generator=generator) * 50
    with torch.inference_mode():
        reference = model.backbone(image)
        num_norms = sum(isinstance(m, torch.nn.Module) and type(m).__name__ == "FrozenBatchNorm2d" for m in model.modules())
        assert fold_frozen_batchnorm(model) == num_norms > 0
        assert not any(type(m).__name__ == "FrozenBatchNorm2d" for m in model.modules())
        folded = model.backbone(image)
    for a, b in zip(reference, folded):
        assert float((a - b).norm() / a.norm()) < 1e-5
    with torch.inference_mode():
        assert fold_frozen_batchnorm(model) == 0  # idempotent
