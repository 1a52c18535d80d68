"""Config: bad values are rejected before anything starts, with the key named; --set works."""

from __future__ import annotations

import argparse

import pytest

from raysweep.config import (DEFAULT_CONFIG, Config, add_config_args, apply_override, config_from_args,
                             load_config)
from raysweep.errors import RaysweepError


def rejects(raw: dict, key: str) -> str:
    with pytest.raises(RaysweepError) as err:
        Config.from_dict(raw)
    assert f"'{key}'" in str(err.value), f"message must name {key}: {err.value}"
    return str(err.value)


def test_default_config_is_the_source_plan_recipe():
    cfg = load_config()
    assert cfg.data.source == "timm/mini-imagenet" and cfg.data.image_size == 227
    assert cfg.sweep.fractions == [1.0, 0.5, 0.25, 0.125, 0.0625] and cfg.sweep.seeds == [0, 1, 2]
    t = cfg.train
    assert (t.epochs, t.optimizer, t.lr, t.momentum, t.weight_decay, t.batch_size) == (90, "sgd", 0.01, 0.9, 5e-4, 128)


def test_smoke_config_is_synthetic_and_small():
    cfg = load_config(DEFAULT_CONFIG.parent / "smoke.yaml")
    assert cfg.data.source == "synthetic" and cfg.train.epochs <= 5


@pytest.mark.parametrize("raw, key", [
    ({"train": {"epochz": 3}}, "train.epochz"),
    ({"data": {"sauce": "x"}}, "data.sauce"),
    ({"trian": {"epochs": 3}}, "trian"),
])
def test_unknown_key_is_rejected(raw, key):
    assert "unknown config key" in rejects(raw, key)


@pytest.mark.parametrize("raw, key", [
    ({"train": {"epochs": "ten"}}, "train.epochs"),
    ({"train": {"epochs": 2.5}}, "train.epochs"),
    ({"train": {"epochs": True}}, "train.epochs"),      # a YAML bool is not a number
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"train": {"optimizer": "rmsprop"}}, "train.optimizer"),
    ({"sweep": {"fractions": 0.5}}, "sweep.fractions"),
    ({"sweep": {"fractions": [1.0, "half"]}}, "sweep.fractions[1]"),
    ({"data": {"on_bad_image": "ignore"}}, "data.on_bad_image"),
])
def test_wrong_type_is_rejected(raw, key):
    rejects(raw, key)


@pytest.mark.parametrize("bad", [0.0, -0.25, 1.5])
def test_fraction_outside_unit_interval_is_rejected(bad):
    assert "outside (0, 1]" in rejects({"sweep": {"fractions": [1.0, bad]}}, "sweep.fractions[1]")


def test_fraction_one_is_allowed():
    assert Config.from_dict({"sweep": {"fractions": [1.0]}}).sweep.fractions == [1.0]


def test_empty_fraction_list_is_rejected():
    assert "empty" in rejects({"sweep": {"fractions": []}}, "sweep.fractions")


@pytest.mark.parametrize("epochs", [0, -3])
def test_epochs_below_one_is_rejected(epochs):
    rejects({"train": {"epochs": epochs}}, "train.epochs")


def test_set_overrides_are_parsed_as_yaml_values():
    cfg = load_config(None, ["train.lr=0.02", "train.optimizer=adamw", "sweep.fractions=[1, 0.5]",
                             "sweep.seeds=[4]", "data.source=synthetic", "train.hflip=false"])
    assert cfg.train.lr == 0.02 and cfg.train.optimizer == "adamw"
    assert cfg.sweep.fractions == [1.0, 0.5] and isinstance(cfg.sweep.fractions[1], float)
    assert cfg.sweep.seeds == [4] and cfg.data.source == "synthetic" and cfg.train.hflip is False


@pytest.mark.parametrize("assignment, needle", [
    ("train.lr", "section.key=value"),          # no '='
    ("=3", "section.key=value"),                # no key
    ("train.nope=1", "'train.nope'"),           # unknown key through --set
    ("train.epochs=0", "'train.epochs'"),       # range check through --set
    ("sweep.fractions=[]", "'sweep.fractions'"),
    ("train.lr.x=1", "'train.lr.x'"),           # descending into a value
])
def test_bad_set_overrides_are_rejected(assignment, needle):
    with pytest.raises(RaysweepError) as err:
        load_config(None, [assignment])
    assert needle in str(err.value)


def test_apply_override_builds_nested_sections():
    raw: dict = {}
    apply_override(raw, "train.batch_size=64")
    assert raw == {"train": {"batch_size": 64}}


def test_dedicated_flags_win_over_set():
    p = argparse.ArgumentParser()
    add_config_args(p)
    args = p.parse_args(["--set", "data.source=synthetic", "--set", "train.epochs=3"])
    cfg = config_from_args(args, {"data.source": "/tmp/my data", "train.epochs": None})
    assert cfg.data.source == "/tmp/my data" and cfg.train.epochs == 3


def test_missing_or_invalid_config_file_names_the_file(tmp_path):
    with pytest.raises(RaysweepError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(RaysweepError, match="bad.yaml"):
        load_config(bad)


@pytest.mark.parametrize("seeds, key", [([-1], "sweep.seeds[0]"), ([0, 1, -7], "sweep.seeds[2]")])
def test_a_negative_seed_is_rejected(seeds, key):
    assert "must be >= 0" in rejects({"sweep": {"seeds": seeds}}, key)


def test_another_model_with_the_demo_config_says_which_override_to_add():
    """configs/demo.yaml sets model.width=0.0625 for AlexNet; the README's --set model.name=resnet18
    must then say what else to pass, and that override must work."""
    demo = DEFAULT_CONFIG.parent / "demo.yaml"
    with pytest.raises(RaysweepError) as err:
        load_config(demo, ["model.name=resnet18"])
    assert "'model.width' = 0.0625 applies to alexnet only" in str(err.value)
    assert "add --set model.width=1" in str(err.value)
    cfg = load_config(demo, ["model.name=resnet18", "model.width=1"])
    assert (cfg.model.name, cfg.model.width) == ("resnet18", 1.0)
