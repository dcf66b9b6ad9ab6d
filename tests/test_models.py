"""Tests for vericar.models: offline EfficientNet-Lite weights, registry, head, embedding model, transforms."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vericar import models
from vericar.embed import normalize, square_tensor
from vericar.models import (
    BACKBONES,
    BackboneSpec,
    EmbeddingModel,
    ProjectionHead,
    build_backbone,
    build_model,
    convert_lite_state_dict,
    load_imagenet_classifier,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No test may download anything: downloads off, empty torch hub cache."""
    monkeypatch.delenv(models.ALLOW_DOWNLOAD_ENV, raising=False)
    monkeypatch.delenv(models.OPENCLIP_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


# ------------------------------------------------------------------ offline EfficientNet-Lite weights

@pytest.mark.parametrize("variant", ["lite0", "lite2"])
@pytest.mark.parametrize("num_classes", [0, 1000])
def test_lite_checkpoint_maps_exactly_and_loads_strict(variant, num_classes):
    import timm

    model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False, num_classes=num_classes)
    source = torch.load(models._lite_checkpoint_path(variant), map_location="cpu", weights_only=True)
    converted = convert_lite_state_dict(source, model)
    target = model.state_dict()
    assert set(converted) == set(target)
    assert all(converted[k].shape == target[k].shape for k in target)
    # every source tensor is used once (only the classifier may be dropped for a headless model)
    dropped = 2 if num_classes == 0 else 0
    assert len(converted) == len(source) - dropped
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.conv_stem.weight, source["_conv_stem.weight"])


def test_lite_mapping_rejects_wrong_architecture():
    import timm

    lite2 = timm.create_model("tf_efficientnet_lite2", pretrained=False, num_classes=0)
    lite0_weights = torch.load(models._lite_checkpoint_path("lite0"), map_location="cpu", weights_only=True)
    with pytest.raises(RuntimeError, match="mapping failed"):
        convert_lite_state_dict(lite0_weights, lite2)


def test_lite_mapping_drops_tf_background_class():
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(models._lite_checkpoint_path("lite0"), map_location="cpu", weights_only=True)
    fc_w, fc_b = source["_fc.weight"], source["_fc.bias"]
    source["_fc.weight"] = torch.cat([torch.zeros(1, fc_w.shape[1]), fc_w])
    source["_fc.bias"] = torch.cat([torch.zeros(1), fc_b])
    converted = convert_lite_state_dict(source, model)
    assert torch.equal(converted["classifier.weight"], fc_w)
    assert torch.equal(converted["classifier.bias"], fc_b)


def _top5(model, spec, image: np.ndarray) -> list[int]:
    x = normalize(square_tensor(Image.fromarray(image), spec.default_size, spec.interpolation)[None], spec)
    with torch.no_grad():
        return model(x)[0].topk(5).indices.tolist()


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_pretrained_lite_recognises_known_photos(name):
    """A wrong key mapping or preprocessing would not classify these scikit-image photos."""
    from skimage import data

    model, spec = load_imagenet_classifier(name)
    assert model.classifier.out_features == 1000
    assert set(_top5(model, spec, data.chelsea())) & {281, 282, 285}  # tabby / tiger cat / Egyptian cat
    assert set(_top5(model, spec, data.coffee())) & {967, 968, 504}  # espresso / cup / coffee mug


def test_load_imagenet_classifier_unknown():
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        load_imagenet_classifier("tiny_cnn")


@pytest.mark.parametrize("name,dim,size", [("efficientnet_lite0", 1280, 224), ("efficientnet_lite2", 1280, 260)])
def test_lite_backbone_features(name, dim, size):
    backbone, spec = build_backbone(name, pretrained=True)
    assert isinstance(spec, BackboneSpec)
    assert (spec.name, spec.feature_dim, spec.default_size) == (name, dim, size)
    assert spec.mean == spec.std == (0.5, 0.5, 0.5) and spec.interpolation == "bicubic"
    assert "offline wheel" in spec.source
    with torch.no_grad():
        out = backbone.eval()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, dim)


# ------------------------------------------------------------------ registry

def test_registry_names():
    assert set(BACKBONES) == {"efficientnet_lite0", "efficientnet_lite2", "resnet50", "openclip_vit_b16", "tiny_cnn"}
    assert models.DEFAULT_BACKBONE == "efficientnet_lite0"


def test_unknown_backbone_lists_known_names():
    with pytest.raises(ValueError) as err:
        build_backbone("vgg11")
    for name in BACKBONES:
        assert name in str(err.value)


def test_tiny_cnn_forward():
    backbone, spec = build_backbone("tiny_cnn")
    assert spec.feature_dim == 64
    assert sum(p.numel() for p in backbone.parameters()) < 20_000
    assert backbone(torch.randn(3, 3, 64, 64)).shape == (3, 64)


def test_resnet50_random_init():
    backbone, spec = build_backbone("resnet50", pretrained=False)
    assert spec.feature_dim == 2048 and spec.source == "random init"
    with torch.no_grad():
        assert backbone.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 2048)


def test_resnet50_pretrained_without_cache_raises_clear_error():
    with pytest.raises(RuntimeError, match="no resnet50 ImageNet weights available offline") as err:
        build_backbone("resnet50", pretrained=True)
    assert "pretrained=False" in str(err.value) and "efficientnet_lite0" in str(err.value)


def test_resnet50_pretrained_from_cache(tmp_path):
    """A weights file in the torch hub cache is used without any download."""
    from torchvision.models import ResNet50_Weights, resnet50

    reference = resnet50(weights=None)
    filename = ResNet50_Weights.IMAGENET1K_V2.url.rsplit("/", 1)[-1]
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / filename)
    backbone, spec = build_backbone("resnet50", pretrained=True)
    assert "IMAGENET1K_V2" in spec.source
    assert torch.equal(backbone.conv1.weight, reference.conv1.weight)


def test_openclip_missing_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    with pytest.raises(RuntimeError, match="pip install open_clip_torch"):
        build_backbone("openclip_vit_b16", pretrained=False)


# ------------------------------------------------------------------ head and embedding model

def test_projection_head_shapes():
    head = ProjectionHead(64, embedding_dim=32, hidden_dim=128, dropout=0.2)
    layers = list(head.net)
    assert [type(m) for m in layers] == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU,
                                         torch.nn.Dropout, torch.nn.Linear]
    assert layers[3].p == 0.2
    assert head(torch.randn(4, 64)).shape == (4, 32)


def test_embedding_model_outputs_unit_vectors():
    torch.manual_seed(0)
    model = build_model("tiny_cnn", embedding_dim=16)
    assert isinstance(model, EmbeddingModel)
    assert model.spec.name == "tiny_cnn" and model.config["embedding_dim"] == 16
    x = torch.randn(4, 3, 64, 64)
    for mode in (model.train, model.eval):
        mode()
        emb = model(x)
        assert emb.shape == (4, 16)
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    assert model.features(x).shape == (4, 64)


def test_embedding_model_on_lite0_default():
    model = build_model(pretrained=False, embedding_dim=8).eval()
    assert model.spec.name == "efficientnet_lite0"
    with torch.no_grad():
        emb = model(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))


def test_param_groups_cover_trainable_params_exactly_once():
    model = build_model("tiny_cnn")
    model.backbone[0][0].weight.requires_grad_(False)  # a frozen tensor is left out
    groups = model.param_groups(backbone_lr=1e-4, head_lr=1e-3, weight_decay=0.05)
    grouped = [p for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len({id(p) for p in grouped}) == len(trainable)
    assert {id(p) for p in grouped} == {id(p) for p in trainable}
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay"}
    assert by_name["backbone_decay"]["lr"] == 1e-4 and by_name["head_decay"]["lr"] == 1e-3
    assert by_name["head_decay"]["weight_decay"] == 0.05 and by_name["head_no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim <= 1 for p in by_name["backbone_no_decay"]["params"])
    torch.optim.AdamW(groups)  # accepted as is


# ------------------------------------------------------------------ model input (the path training and serving use)

@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_square_tensor_then_normalize_give_a_normalised_square_tensor(mode):
    spec = build_backbone("tiny_cnn")[1]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 60, 3), dtype=np.uint8)).convert(mode)
    out = normalize(square_tensor(image, 48, spec.interpolation)[None], spec)
    assert out.shape == (1, 3, 48, 48) and out.dtype == torch.float32


def test_square_tensor_is_a_deterministic_stretch_and_normalize_uses_the_spec():
    spec = BackboneSpec("x", 1, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 32, "test")
    image = Image.new("RGB", (100, 20), (255, 0, 255))
    out = normalize(square_tensor(image, 16)[None], spec)[0]
    assert out.shape == (3, 16, 16)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([1.0, -1.0, 1.0]))
    assert torch.equal(out, normalize(square_tensor(image, 16)[None], spec)[0])
