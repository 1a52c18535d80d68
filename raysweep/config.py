"""One typed configuration for a sweep: YAML file, then `--set section.key=value` overrides.

Every key is checked before anything starts: unknown keys, wrong types and out-of-range
values raise `RaysweepError` naming the key (e.g. `train.epochs`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from raysweep.errors import RaysweepError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


@dataclass
class DataConfig:
    # A Hugging Face dataset id, a local directory of hub-layout parquet, or "synthetic".
    source: str = "timm/mini-imagenet"
    # Where decoded 227x227 uint8 caches live; shared by every trial (and every sweep).
    cache_dir: str = "~/.cache/raysweep"
    image_size: int = 227
    on_bad_image: Literal["fail", "skip"] = "fail"
    # Hub layouts: `{config}/{split}-*.parquet` holds one folder per config; which one to read
    # when there are several ("" = the only one, or data/ and top-level files).
    config: str = ""
    # Columns; "" = found from the parquet's `huggingface` features (the Image and the
    # ClassLabel feature), else the usual names (image/img, label/labels/fine_label).
    image_column: str = ""
    label_column: str = ""
    # A dataset without a validation split gets one carved from train: stratified, seeded by
    # val_seed, the same rows for every trial and seed, and never in any training subset.
    val_fraction: float = 0.1
    val_seed: int = 0
    # Only for source == "synthetic": the shape of the generated set.
    synthetic_classes: int = 10
    synthetic_train_per_class: int = 40
    synthetic_val_per_class: int = 10
    synthetic_test_per_class: int = 10
    synthetic_seed: int = 0


@dataclass
class ModelConfig:
    # "alexnet" is torchvision's AlexNet; any other torchvision classification model name
    # (e.g. "resnet18") is built from scratch by torchvision.models.get_model.
    name: str = "alexnet"
    # AlexNet only: multiplies its convolution channels and classifier units. 1.0 is exactly
    # torchvision's model; 0.25 is the same architecture at about 1/16 of the cost.
    width: float = 1.0


@dataclass
class TrainConfig:
    epochs: int = 90
    # "epochs": every fraction trains for `epochs` passes (the source plan).
    # "steps": every fraction gets the optimizer steps of `epochs` passes over the full set.
    budget: Literal["epochs", "steps"] = "epochs"
    batch_size: int = 128
    eval_batch_size: int = 512
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # "plateau" is AlexNet's own rule: multiply lr by step_gamma when the select metric has not
    # improved for `patience` epochs; after `plateau_drops` such drops the next plateau ends it.
    schedule: Literal["step", "cosine", "constant", "plateau"] = "step"
    step_epochs: int = 30  # "step": multiply lr by step_gamma every step_epochs epochs
    step_gamma: float = 0.1
    plateau_drops: int = 2
    warmup_epochs: float = 0.0  # linear warm-up from ~0 to lr
    dropout: float = 0.5
    # Early stopping: stop after this many epochs without a new best of select_metric, which
    # must also hold as many optimizer steps as this many passes over the whole training split
    # (a small subset's epoch is a few steps). 0 = always train `epochs` (then a count, not a cap).
    patience: int = 0
    # What counts as "no new best" for early stopping and plateaus, so that every subset size is
    # judged alike (the tested checkpoint is still the raw best epoch):
    # - the select metric smoothed as an exponential moving average, this weight on the past
    #   (0 = raw): a small validation split's epoch-to-epoch noise no longer sets the pace;
    # - and no stop (or lr drop) while the training loss still falls faster than this many nats
    #   per epoch, its least-squares slope over the last max(6, 2 x patience) epochs: a large
    #   subset is not stopped while it is still learning. 0 = off;
    # - while it falls, the patience in epochs is stop_loss_patience times longer, then the trial
    #   stops anyway: a validation error flat that long with a falling training loss is memorising,
    #   not learning. 0 = wait as long as the loss falls.
    val_smoothing: float = 0.5
    stop_loss_slope: float = 0.02
    stop_loss_patience: float = 4.0
    # The validation error that picks the tested checkpoint and drives early stopping.
    # "auto": val_top5_error with 50 or more classes, else val_top1_error (raysweep.trial.metrics).
    select_metric: Literal["auto", "val_top1_error", "val_top5_error", "val_loss"] = "auto"
    # Augmentation (on the device): random-resized-crop with this minimum area, and flips.
    crop_scale_min: float = 0.35
    hflip: bool = True
    # Speed knobs: bf16 autocast takes effect on CUDA only; channels_last (NHWC) on any device.
    bf16: bool = True
    channels_last: bool = True
    compile: bool = False
    # Torch intra-op threads for a CPU worker; 0 = the CPUs this trial was given.
    num_threads: int = 0
    # Testing aid: raise once at the end of this epoch (1-based) to exercise resume. 0 = off.
    fail_at_epoch: int = 0


@dataclass
class SweepConfig:
    fractions: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25, 0.125, 0.0625])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # Model widths (AlexNet's channel multiplier, as model.width): the grid is fraction x width
    # x seed. Empty: model.width alone. Every width trains on the same nested subsets per seed.
    widths: list[float] = field(default_factory=list)
    # "auto": pack small-fraction trials several to a GPU, give large ones a whole GPU, from
    # the GPU's memory and each trial's data size. A number keeps its meaning: 1, 2, ... GPUs
    # (one worker each), or a share below 1 for every trial.
    gpus_per_trial: float | Literal["auto"] = "auto"
    cpus_per_trial: int = 1
    # A CPU trial's workers (DDP over gloo, each with cpus_per_trial CPUs). GPU trials take one
    # worker per GPU from gpus_per_trial instead.
    cpu_workers_per_trial: int = 1
    max_failures: int = 2
    storage_path: str = "./results"
    # Checkpoints kept per trial besides the best one (by the select metric).
    keep_checkpoints: int = 1
    # At most this many trials at once (0: as many as the resources allow).
    max_concurrent_trials: int = 0
    # Write a checkpoint every this many epochs (and always after the last one). 0 = auto:
    # as often as keeps checkpointing under ~2% of the trial's time.
    checkpoint_every: int = 0


@dataclass
class Config:
    name: str = "sweep"
    # One line shown in the README table and the report, e.g. why a demo uses AdamW.
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def widths(self) -> list[float]:
        """The grid's widths: sweep.widths, or model.width alone."""
        return [float(w) for w in self.sweep.widths] or [float(self.model.width)]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Config":
        cfg = _build(cls, raw, prefix="")
        validate(cfg)
        return cfg


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except RaysweepError:
                continue
        raise RaysweepError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise RaysweepError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise RaysweepError(f"config key '{key}' must be a {_type_name(tp)}, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    # bool is an int in Python; a YAML `true` is never a valid number here.
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise RaysweepError(
            f"config key '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise RaysweepError(f"config section '{where}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise RaysweepError(f"unknown config key '{prefix}{key}' (known keys in {where}: {known})")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    fr = cfg.sweep.fractions
    if not fr:
        raise RaysweepError("config key 'sweep.fractions' is empty: give at least one fraction in (0, 1]")
    for i, f in enumerate(fr):
        if not 0.0 < f <= 1.0:
            raise RaysweepError(f"config key 'sweep.fractions[{i}]' = {f} is outside (0, 1]")
    if len(set(fr)) != len(fr):
        raise RaysweepError(f"config key 'sweep.fractions' has duplicates: {fr}")
    if not cfg.sweep.seeds:
        raise RaysweepError("config key 'sweep.seeds' is empty: give at least one seed")
    if len(set(cfg.sweep.seeds)) != len(cfg.sweep.seeds):
        raise RaysweepError(f"config key 'sweep.seeds' has duplicates: {cfg.sweep.seeds}")
    for i, seed in enumerate(cfg.sweep.seeds):
        if seed < 0:  # numpy's and torch's generators take seeds >= 0 only
            raise RaysweepError(f"config key 'sweep.seeds[{i}]' = {seed} must be >= 0")
    positive = {
        "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size,
        "train.eval_batch_size": cfg.train.eval_batch_size,
        "train.step_epochs": cfg.train.step_epochs,
        "data.image_size": cfg.data.image_size,
        "data.synthetic_classes": cfg.data.synthetic_classes,
        "data.synthetic_train_per_class": cfg.data.synthetic_train_per_class,
        "data.synthetic_val_per_class": cfg.data.synthetic_val_per_class,
        "data.synthetic_test_per_class": cfg.data.synthetic_test_per_class,
        "sweep.cpus_per_trial": cfg.sweep.cpus_per_trial,
        "sweep.cpu_workers_per_trial": cfg.sweep.cpu_workers_per_trial,
    }
    for key, value in positive.items():
        if value < 1:
            raise RaysweepError(f"config key '{key}' must be >= 1, got {value}")
    nonneg = {
        "train.lr": cfg.train.lr,
        "train.momentum": cfg.train.momentum,
        "train.weight_decay": cfg.train.weight_decay,
        "train.warmup_epochs": cfg.train.warmup_epochs,
        "train.num_threads": cfg.train.num_threads,
        "train.fail_at_epoch": cfg.train.fail_at_epoch,
        "train.patience": cfg.train.patience,
        "train.plateau_drops": cfg.train.plateau_drops,
        "sweep.checkpoint_every": cfg.sweep.checkpoint_every,
        "sweep.max_concurrent_trials": cfg.sweep.max_concurrent_trials,
        "sweep.max_failures": cfg.sweep.max_failures,
        "sweep.keep_checkpoints": cfg.sweep.keep_checkpoints,
    }
    for key, value in nonneg.items():
        if value < 0:
            raise RaysweepError(f"config key '{key}' must be >= 0, got {value}")
    if cfg.train.schedule == "plateau" and cfg.train.patience < 1:
        raise RaysweepError("config key 'train.patience' must be >= 1 with train.schedule=plateau "
                            "(the epochs without improvement that count as a plateau)")
    if cfg.train.lr == 0:
        raise RaysweepError("config key 'train.lr' must be > 0")
    if not 0.0 <= cfg.train.dropout < 1.0:
        raise RaysweepError(f"config key 'train.dropout' must be in [0, 1), got {cfg.train.dropout}")
    if not 0.0 <= cfg.train.val_smoothing < 1.0:
        raise RaysweepError(f"config key 'train.val_smoothing' must be in [0, 1), got {cfg.train.val_smoothing}")
    if cfg.train.stop_loss_patience < 0:
        raise RaysweepError(f"config key 'train.stop_loss_patience' must be >= 0, got {cfg.train.stop_loss_patience}")
    if cfg.train.stop_loss_slope < 0:
        raise RaysweepError(f"config key 'train.stop_loss_slope' must be >= 0, got {cfg.train.stop_loss_slope}")
    if not 0.0 < cfg.train.crop_scale_min <= 1.0:
        raise RaysweepError(f"config key 'train.crop_scale_min' must be in (0, 1], got {cfg.train.crop_scale_min}")
    g = cfg.sweep.gpus_per_trial
    if g != "auto":
        if g < 0:
            raise RaysweepError(f"config key 'sweep.gpus_per_trial' must be 'auto' or >= 0, got {g}")
        if g > 1 and g != int(g):
            raise RaysweepError(f"config key 'sweep.gpus_per_trial' above 1 must be a whole number, got {g}")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise RaysweepError(f"config key 'data.val_fraction' must be in (0, 1), got {cfg.data.val_fraction}")
    if not cfg.model.name.strip():
        raise RaysweepError("config key 'model.name' is empty: give a torchvision model name, e.g. alexnet")
    if not 0.0 < cfg.model.width <= 4.0:
        raise RaysweepError(f"config key 'model.width' must be in (0, 4], got {cfg.model.width}")
    for w in cfg.sweep.widths:
        if not 0.0 < w <= 4.0:
            raise RaysweepError(f"config key 'sweep.widths' holds {w}: every width must be in (0, 4]")
    if len(set(cfg.sweep.widths)) != len(cfg.sweep.widths):
        raise RaysweepError(f"config key 'sweep.widths' has duplicates: {cfg.sweep.widths}")
    if cfg.sweep.widths and cfg.model.name != "alexnet":
        raise RaysweepError(f"config key 'sweep.widths' applies to alexnet only; model.name is {cfg.model.name!r}")
    if cfg.model.width != 1.0 and cfg.model.name != "alexnet":
        raise RaysweepError(f"config key 'model.width' = {cfg.model.width:g} applies to alexnet only; model.name "
                            f"is {cfg.model.name!r}: add --set model.width=1 (the config sets the width for alexnet)")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RaysweepError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RaysweepError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise RaysweepError(f"config file {path} must hold a mapping at the top level")
    return raw


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file's raw mapping, before defaults and checks (errors name the file)."""
    return _read_yaml(Path(path))


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` to a raw config dict; the value is parsed as YAML."""
    if "=" not in assignment:
        raise RaysweepError(f"--set expects section.key=value, got {assignment!r}")
    dotted, _, text = assignment.partition("=")
    parts = [p for p in dotted.strip().split(".") if p]
    if not parts:
        raise RaysweepError(f"--set expects section.key=value, got {assignment!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise RaysweepError(f"config key '{dotted}': '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (default: configs/default.yaml) and apply `--set` overrides."""
    raw = _read_yaml(Path(path) if path else DEFAULT_CONFIG)
    for assignment in overrides or []:
        apply_override(raw, assignment)
    return Config.from_dict(raw)


def add_config_args(parser) -> None:
    """The flags every config-driven CLI shares."""
    parser.add_argument("--config", default=None, metavar="YAML",
                        help=f"config file (default: {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parent.parent)})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set train.lr=0.02 (repeatable)")


def flag_assignments(flag_overrides: dict[str, Any] | None) -> list[str]:
    """The dedicated flags given ({"train.epochs": 5, "sweep.seeds": None}) as `key=value` overrides."""
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in (flag_overrides or {}).items() if value is not None]


def config_from_args(args, flag_overrides: dict[str, Any] | None = None) -> Config:
    """Build the config from `--config`, then `--set`, then the dedicated flags (which win)."""
    return load_config(args.config, list(args.overrides) + flag_assignments(flag_overrides))
