"""The network under study: torchvision's AlexNet, trained from scratch.

The library's implementation is used as is (227x227 input, adaptive pooling before the
classifier); only the class count and the dropout rate follow the experiment.
"""

from __future__ import annotations

import torch.nn as nn
from torchvision.models import alexnet


def build_model(num_classes: int = 100, dropout: float = 0.5) -> nn.Module:
    """A freshly initialised AlexNet; seed torch's global RNG first for a reproducible init."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return alexnet(weights=None, num_classes=num_classes, dropout=dropout)
