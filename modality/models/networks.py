"""One-channel timm networks by name, with the reference study's extra dropout and local pretrained weights.

Never downloads: ``pretrained=False`` always, and weights come only from a local file the user names.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

#: The reference study's six networks, as timm names (its "MnasNet" is torchvision's mnasnet1_0).
REFERENCE_NETWORKS = {
    "vgg16": "vgg16",
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "densenet121": "densenet121",
    "mnasnet": "mnasnet_100",
}


def insert_dropout_after_pooling(network: nn.Module, probability: float) -> int:
    """Put ``nn.Dropout(p)`` after every max-pooling layer; returns how many were added.

    The reference study's regularised VGG16 had "5 Dropout layers with p = 0.5": VGG16 has exactly five
    max-pooling stages, so this reproduces it (timm's ``drop_rate`` only adds dropout in the classifier).
    """
    added = 0
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.Sequential(child, nn.Dropout(probability)))
                added += 1
    return added


def first_conv_name(network: nn.Module) -> str:
    """The module path of the first convolution (timm records it in ``pretrained_cfg['first_conv']``)."""
    cfg = getattr(network, "pretrained_cfg", None) or getattr(network, "default_cfg", None) or {}
    name = cfg.get("first_conv")
    if name:
        return name
    for module_name, module in network.named_modules():
        if isinstance(module, nn.Conv2d):
            return module_name
    raise ValueError("network has no convolution")


def adapt_state_dict_to_channels(
    state: dict[str, torch.Tensor], conv_weight_key: str, channels: int = 1
) -> dict[str, torch.Tensor]:
    """Sum an RGB first-convolution kernel over its input channels and share it out over ``channels``: a grey
    image replicated to RGB gives exactly the same response as the grey image in every one of the network's
    channels, so ImageNet-style weights stay meaningful for one- or two-channel input."""
    weight = state.get(conv_weight_key)
    if weight is not None and weight.ndim == 4 and weight.shape[1] == 3 and channels != 3:
        state = dict(state)
        state[conv_weight_key] = weight.sum(dim=1, keepdim=True).repeat(1, channels, 1, 1) / channels
    return state


def load_local_weights(network: nn.Module, pretrained_path: str | Path) -> list[str]:
    """Load weights from a local file (never pickle, never a download); classifier mismatches are skipped.

    Returns the names of parameters left at their initial values (the new head, usually).

    Why not timm's own local loading (``timm.create_model(name, pretrained=True,
    pretrained_cfg_overlay=dict(file=path), in_chans=1, num_classes=n)``, checked in timm 1.0.31): it does
    unpickle nothing (``_helpers.load_state_dict``, ``weights_only=True`` or safetensors), sums an RGB first
    conv to one channel as we do (``_manipulate.adapt_input_conv``, line 332), drops the classifier and touches
    no network when ``file`` is set (``_builder._resolve_pretrained_source``, line 72). But dropping the
    classifier switches the whole load to ``strict=False`` (``_builder.load_pretrained``, lines 304-309, then
    ``model.load_state_dict(state_dict, strict=strict)`` at line 318), so a file that matches nothing loads
    nothing with only a log warning: our own Lightning checkpoints (keys ``network.*``; timm's
    ``clean_state_dict`` strips only ``module.`` and ``_orig_mod.``) and weights of another architecture would
    train from random initialisation silently. Here the first loads and the second is an error (tested). The
    head is also dropped by comparing ``num_classes`` with the pretrained config's 1000, not with the file, and
    a missing file raises a bare ``FileNotFoundError()``.
    """
    path = Path(pretrained_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights not found at {path}: modality never downloads weights; "
            "put a local .pth/.ckpt there or set model.pretrained_path=null"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = {key.removeprefix("network."): value for key, value in state["state_dict"].items()}
    own = network.state_dict()
    conv = f"{first_conv_name(network)}.weight"
    state = adapt_state_dict_to_channels(state, conv, int(own[conv].shape[1]))
    compatible = {key: value for key, value in state.items() if key in own and own[key].shape == value.shape}
    if not compatible:
        raise ValueError(f"no tensor in {path} matches the network's parameters (wrong architecture?)")
    network.load_state_dict(compatible, strict=False)
    return sorted(set(own) - set(compatible))


def create_network(
    name: str,
    num_classes: int,
    dropout: float = 0.0,
    extra_dropout: float = 0.0,
    pretrained_path: str | None = None,
    in_chans: int = 1,
) -> nn.Module:
    """A timm network reading ``in_chans`` channels (one: the slice; two: the slice and its equalised copy,
    ``data.equalize=both``); ``name`` is a reference name (``mnasnet``) or any timm model name."""
    timm_name = REFERENCE_NETWORKS.get(name, name)
    if timm_name not in timm.list_models():
        raise ValueError(f"unknown network '{name}' (timm has no '{timm_name}')")
    network = timm.create_model(
        timm_name, pretrained=False, in_chans=in_chans, num_classes=num_classes, drop_rate=dropout
    )
    if extra_dropout > 0 and insert_dropout_after_pooling(network, extra_dropout) == 0:
        raise ValueError(f"model.extra_dropout needs max-pooling layers and '{name}' has none")
    if pretrained_path:
        load_local_weights(network, pretrained_path)
    return network


def classifier_width(network: nn.Module) -> int:
    """Input width of the network's final linear classifier: what a second head on the same features takes."""
    head = network.get_classifier() if hasattr(network, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(network).__name__} has no linear classifier to put a second head beside")
    return int(head.in_features)


def forward_with_features(network: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, pooled features)``: timm's own path (features -> pooling and dropout -> classifier) cut
    before the classifier, so the logits equal ``network(images)`` and a second head reads the same features."""
    features = network.forward_head(network.forward_features(images), pre_logits=True)
    return network.get_classifier()(features), features
