"""The model choice: torchvision's AlexNet unchanged at width 1, a narrower AlexNet with the same
layout, any torchvision classifier by name, and a cheap check of name and input size."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import AlexNet, alexnet

from raysweep.errors import RaysweepError
from raysweep.trial.model import build_model, model_info


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_width_one_is_torchvisions_alexnet_itself():
    torch.manual_seed(0)
    ours = build_model(100, 0.5, "alexnet", 1.0)
    torch.manual_seed(0)
    ref = alexnet(weights=None, num_classes=100, dropout=0.5)
    assert type(ours) is AlexNet and _count(ours) == _count(ref) == 57_413_540
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    assert ours.classifier[0].p == 0.5


@pytest.mark.parametrize("width", [0.125, 0.25, 0.5, 2.0])
def test_a_narrow_alexnet_has_the_same_layers_scaled(width):
    ref, ours = alexnet(weights=None, num_classes=10), build_model(10, 0.5, "alexnet", width)
    assert list(ours.state_dict()) == list(ref.state_dict())  # the same layers, under the same names
    for (name, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        for dim, (full, got) in enumerate(zip(a.shape, b.shape)):
            # Channels and units scale (dim 0 out, dim 1 in), except the image's 3 input channels,
            # the class count, and kernel sizes (dims 2, 3).
            fixed = dim >= 2 or (name.startswith("features.0.") and dim == 1) or \
                (name.startswith("classifier.6.") and dim == 0)
            assert got == (full if fixed else max(1, round(full * width))), (name, dim)
    # Conv parameters scale with width^2, so the whole network costs about width^2 as much.
    assert _count(ours) / _count(ref) == pytest.approx(width**2, rel=0.12)
    out = ours.eval()(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 10)
    # The same forward as torchvision's: with its weights loaded into torchvision's class (at the
    # narrow shapes), both give the same logits (identical float32 ops in the same order).
    ref_narrow = AlexNet(num_classes=10)
    ref_narrow.features, ref_narrow.classifier = ours.features, ours.classifier
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(ours.eval()(x), ref_narrow.eval()(x))


def test_another_torchvision_model_by_name():
    model = build_model(10, 0.2, "resnet18")
    assert model.fc.out_features == 10 and model(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


def test_model_info_counts_parameters_without_building_weights():
    info = model_info("alexnet", 0.25, 10, 64)
    assert info["num_params"] == _count(build_model(10, 0.5, "alexnet", 0.25))
    assert info["model"] == "alexnet(width=0.25)" and model_info("alexnet", 1.0, 10, 227)["model"] == "alexnet"


@pytest.mark.parametrize("name, width, size, message", [
    ("alexnet", 1.0, 32, "AlexNet needs at least 63 px"),
    ("no_such_net", 1.0, 64, "'no_such_net' is not a torchvision classification model"),
    ("resnet18", 0.5, 64, "'model.width' applies to alexnet only"),
    ("vgg11", 1.0, 16, "cannot take 16x16 input"),
])
def test_bad_model_choices_are_one_line_errors_naming_the_key(name, width, size, message):
    with pytest.raises(RaysweepError) as err:
        model_info(name, width, 10, size)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert "model." in str(err.value) or "data.image_size" in str(err.value)


def test_the_smallest_alexnet_input_works_and_one_less_does_not():
    model_info("alexnet", 1.0, 10, 63)
    with pytest.raises(RaysweepError):
        model_info("alexnet", 1.0, 10, 62)
