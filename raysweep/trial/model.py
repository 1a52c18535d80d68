"""The network under study: torchvision's AlexNet by default, a narrower AlexNet, or any
torchvision classification model by name, always trained from scratch.

`model.width` 1.0 is torchvision's AlexNet itself. Another width builds the same layers with
every convolution's channels and both hidden classifier layers scaled, under the same module
names, so checkpoints and code read alike. Only the class count and dropout follow the sweep.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raysweep.errors import RaysweepError

if TYPE_CHECKING:
    import torch.nn as nn

# AlexNet's stride-4 stem and three 3x3/2 max-pools leave no pixel below this input side.
ALEXNET_MIN_SIZE = 63


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def narrow_alexnet(num_classes: int, dropout: float, width: float) -> "nn.Module":
    """torchvision's AlexNet layout with channels and hidden units multiplied by `width`: the same
    modules under the same names, the same forward (features, 6x6 average pool, classifier), and
    PyTorch's default initialisation as torchvision leaves it. Built without importing
    torchvision, which costs a small CPU 1.5 s at every trial's start (a test holds the layers
    equal to torchvision's)."""
    import torch
    import torch.nn as nn

    class NarrowAlexNet(nn.Module):
        def __init__(self, features: nn.Sequential, classifier: nn.Sequential):
            super().__init__()
            self.features, self.avgpool, self.classifier = features, nn.AdaptiveAvgPool2d((6, 6)), classifier

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    c1, c2, c3, c4, c5 = (_scaled(c, width) for c in (64, 192, 384, 256, 256))
    hidden = _scaled(4096, width)
    features = nn.Sequential(
        nn.Conv2d(3, c1, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(c1, c2, kernel_size=5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(c2, c3, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c3, c4, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(c4, c5, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )
    classifier = nn.Sequential(
        nn.Dropout(p=dropout), nn.Linear(c5 * 6 * 6, hidden), nn.ReLU(inplace=True),
        nn.Dropout(p=dropout), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )
    return NarrowAlexNet(features, classifier)


def needs_torchvision(name: str, width: float) -> bool:
    """Whether building this model imports torchvision (a narrow AlexNet does not)."""
    return not (name == "alexnet" and width != 1.0)


def classification_models() -> list[str]:
    """Names torchvision can build as image classifiers (its top-level models namespace)."""
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def build_model(num_classes: int = 100, dropout: float = 0.5, name: str = "alexnet",
                width: float = 1.0) -> "nn.Module":
    """A freshly initialised classifier; seed torch's global RNG first for a reproducible init."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if name == "alexnet":
        if width == 1.0:
            from torchvision.models import alexnet

            return alexnet(weights=None, num_classes=num_classes, dropout=dropout)
        return narrow_alexnet(num_classes, dropout, width)
    if width != 1.0:
        raise RaysweepError(f"config key 'model.width' applies to alexnet only; model.name is {name!r}")
    import torchvision.models as tvm

    names = classification_models()
    if name not in names:
        raise RaysweepError(f"config key 'model.name': {name!r} is not a torchvision classification model "
                            f"(e.g. alexnet, resnet18, vgg11, mobilenet_v3_small; {len(names)} in all)")
    kwargs = {"num_classes": num_classes}
    if name.startswith(("googlenet", "inception")):
        kwargs["aux_logits"] = False  # one output tensor, as the training loop expects
        kwargs["init_weights"] = True
    try:
        return tvm.get_model(name, weights=None, dropout=dropout, **kwargs)
    except TypeError:  # many families take no dropout argument
        return tvm.get_model(name, weights=None, **kwargs)


def describe(name: str, width: float) -> str:
    """The model as reports print it: `alexnet`, `alexnet(width=0.25)`, `resnet18`."""
    return name if width == 1.0 else f"{name}(width={width:g})"


def alexnet_params(num_classes: int, width: float) -> int:
    """AlexNet's parameter count at a width, by layer (no torch: the CLI checks it before Ray)."""
    c1, c2, c3, c4, c5 = (_scaled(c, width) for c in (64, 192, 384, 256, 256))
    h = _scaled(4096, width)
    convs = 3 * c1 * 121 + c1 + c1 * c2 * 25 + c2 + c2 * c3 * 9 + c3 + c3 * c4 * 9 + c4 + c4 * c5 * 9 + c5
    return convs + c5 * 36 * h + h + h * h + h + h * num_classes + num_classes


def model_info(name: str, width: float, num_classes: int, image_size: int, dropout: float = 0.5) -> dict:
    """Name, width and parameter count, checking the input size is large enough.

    AlexNet is counted by arithmetic; any other model is built on the meta device (no memory,
    no initialisation), so either is cheap enough to run before a sweep starts. Raises
    RaysweepError for an unknown name or an input too small for the network.
    """
    if name == "alexnet":
        if image_size < ALEXNET_MIN_SIZE:
            raise RaysweepError(f"config key 'data.image_size' = {image_size}: AlexNet needs at least "
                                f"{ALEXNET_MIN_SIZE} px (its stem and pooling leave nothing below that)")
        return {"name": name, "width": width, "model": describe(name, width),
                "num_params": alexnet_params(num_classes, width), "image_size": image_size}
    import torch

    with torch.device("meta"):
        model = build_model(num_classes, dropout, name, width)
        try:
            model.eval()
            model(torch.empty(1, 3, image_size, image_size))
        except RuntimeError as err:
            raise RaysweepError(f"model {describe(name, width)} cannot take {image_size}x{image_size} input "
                                f"(config key 'data.image_size'): {str(err).splitlines()[0]}") from None
    return {"name": name, "width": width, "model": describe(name, width),
            "num_params": int(sum(p.numel() for p in model.parameters())), "image_size": image_size}
