"""Small built-in models, registered in timm's model registry.

They exist for the built-in digits data (1 x 8 x 8 inputs, 10 classes): the embedded
default run, tests and benchmarks. Because they are ordinary timm registrations,
`timm.create_model("mce_digits_cnn", num_classes=10, in_chans=1)` builds one once
`mcensemble.zoo` is imported, and files name them by architecture like any timm model.
"""
from __future__ import annotations

import torch.nn as nn
from timm.models import register_model

__all__ = ["DigitsMLP", "DigitsCNN"]

default_cfgs = {
    "mce_digits_mlp": dict(input_size=(1, 8, 8), num_classes=10, mean=(0.0,), std=(1.0,),
                           classifier="head", interpolation="bilinear", crop_pct=1.0),
    "mce_digits_cnn": dict(input_size=(1, 8, 8), num_classes=10, mean=(0.0,), std=(1.0,),
                           first_conv="features.0", classifier="head", interpolation="bilinear", crop_pct=1.0),
}


class DigitsMLP(nn.Module):
    """Flatten -> (Linear -> ReLU [-> Dropout]) x depth -> Linear head."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, *, img_size: int = 8,
                 width: int = 128, depth: int = 2, drop_rate: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d_in = in_chans * img_size * img_size
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), nn.ReLU()]
            if drop_rate > 0:
                layers.append(nn.Dropout(drop_rate))
            d_in = width
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(d_in, num_classes)
        self.num_classes = num_classes

    def forward(self, x):
        return self.head(self.layers(x))


class DigitsCNN(nn.Module):
    """VGG-style: (Conv3x3 -> BN -> ReLU) blocks with max-pooling, Flatten, Linear head."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, *, img_size: int = 8,
                 widths: tuple[int, ...] = (32, 64), drop_rate: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_chans, img_size
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            if drop_rate > 0:
                layers.append(nn.Dropout2d(drop_rate))
            layers.append(nn.MaxPool2d(2))
            c, size = w, size // 2
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c * size * size, num_classes)
        self.num_classes = num_classes

    def forward(self, x):
        return self.head(self.features(x))


def _filter_timm_kwargs(kwargs: dict) -> dict:
    # timm.create_model passes pretrained_cfg and friends; these models take none of them.
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "features_only"):
        kwargs.pop(k, None)
    return kwargs


def _with_cfg(model: nn.Module, name: str) -> nn.Module:
    # timm's data-config helpers and our checkpoint readers look for pretrained_cfg.
    cfg = dict(default_cfgs[name], architecture=name, num_classes=model.num_classes)
    model.pretrained_cfg = model.default_cfg = cfg
    return model


@register_model
def mce_digits_mlp(pretrained: bool = False, **kwargs) -> DigitsMLP:
    """Two hidden layers of 128 ReLU units on flattened 8x8 digits."""
    return _with_cfg(DigitsMLP(**_filter_timm_kwargs(kwargs)), "mce_digits_mlp")


@register_model
def mce_digits_cnn(pretrained: bool = False, **kwargs) -> DigitsCNN:
    """Two Conv-BN-ReLU-MaxPool blocks (32, 64 channels) and a linear head, for 8x8 digits."""
    return _with_cfg(DigitsCNN(**_filter_timm_kwargs(kwargs)), "mce_digits_cnn")
