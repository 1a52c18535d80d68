"""Hub layouts: which parquet files hold which split, and which columns hold images and labels.

Reads parquet footers only. Every problem found (missing splits, columns, configs) goes into
one error message, so a user fixes a layout in one run, not one problem per run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raysweep.errors import RaysweepError

# Canonical split -> the names the hub uses for it, in order of preference.
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val"), "test": ("test",)}
IMAGE_NAMES = ("image", "img")
LABEL_NAMES = ("label", "labels", "fine_label")
TOP = "."  # the config name of files at the top level of the dataset directory
EXPECTED = "expected {config}/{split}-*.parquet (e.g. data/, plain_text/) or {split}-*.parquet"


@dataclass
class Layout:
    """The files and columns of one dataset config, ready to read."""

    config: str                                   # folder holding the files (TOP for the top level)
    files: dict[str, list[Path]]                  # canonical split -> parquet files, sorted
    split_names: dict[str, str]                   # canonical split -> its name on disk ("valid", ...)
    image_column: str
    label_column: str
    class_names: list[str] | None                 # from the label column's ClassLabel feature
    configs: list[str] = field(default_factory=list)  # every config seen


def split_of(filename: str) -> tuple[str, str] | None:
    """`train-00000-of-00002.parquet` -> ("train", "train"); `valid.parquet` -> ("validation", "valid")."""
    if not filename.endswith(".parquet"):
        return None
    stem = filename[: -len(".parquet")].split("-", 1)[0]
    for split, aliases in SPLIT_ALIASES.items():
        if stem in aliases:
            return split, stem
    return None


def group_files(relpaths) -> dict[str, dict[str, dict[str, list[str]]]]:
    """Relative paths -> config folder -> canonical split -> name on disk -> paths (sorted).

    A config is a folder directly under the root (`data/` is the hub's default config), or
    TOP for split files at the top level. Deeper files and non-split files are ignored.
    """
    groups: dict[str, dict[str, dict[str, list[str]]]] = {}
    for rel in sorted(str(p).replace("\\", "/") for p in relpaths):
        parts = rel.split("/")
        if len(parts) > 2 or any(p.startswith(".") for p in parts):
            continue
        found = split_of(parts[-1])
        if found is None:
            continue
        config = parts[0] if len(parts) == 2 else TOP
        split, name = found
        groups.setdefault(config, {}).setdefault(split, {}).setdefault(name, []).append(rel)
    return groups


def hub_patterns(config: str = "") -> list[str]:
    """`allow_patterns` for snapshot_download: the split files of every layout, or of one config."""
    names = [a for aliases in SPLIT_ALIASES.values() for a in aliases]
    if config and config != TOP:
        return [f"{config}/{n}{tail}" for n in names for tail in ("-*.parquet", ".parquet")]
    return [f"{lead}{n}{tail}" for lead in ("", "*/") for n in names for tail in ("-*.parquet", ".parquet")]


def list_parquet(root: Path) -> list[str]:
    """Parquet files at the top level and one folder down, relative to `root`."""
    return [p.relative_to(root).as_posix() for p in [*root.glob("*.parquet"), *root.glob("*/*.parquet")]]


def describe_configs(groups) -> str:
    if not groups:
        return "none"
    return ", ".join(f"{c if c == TOP else c + '/'} ({', '.join(_on_disk(g))})" for c, g in groups.items())


def _on_disk(group) -> list[str]:
    return [name for split in SPLIT_ALIASES if split in group for name in group[split]]


def features_of(schema: pa.Schema) -> dict:
    """The `huggingface` features recorded in a parquet schema ({} when absent or unreadable)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        features = json.loads(raw)["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError):
        return {}
    return features if isinstance(features, dict) else {}


def _kind(feature) -> str:
    return feature.get("_type", "") if isinstance(feature, dict) else ""


def describe_columns(schema: pa.Schema) -> str:
    """`img (Image), label (ClassLabel, 10 names), extra (int64)` for error messages."""
    features = features_of(schema)
    out = []
    for f in schema:
        kind = _kind(features.get(f.name))
        if kind == "ClassLabel":
            n = len(features[f.name].get("names") or []) or features[f.name].get("num_classes")
            out.append(f"{f.name} (ClassLabel, {n} names)")
        else:
            out.append(f"{f.name} ({kind if kind and kind != 'Value' else f.type})")
    return ", ".join(out) or "none"


def _pick(schema: pa.Schema, features: dict, kind: str, usual: tuple[str, ...], override: str,
          key: str, what: str) -> tuple[str | None, str | None]:
    """(column, problem): the override, else the one column with this feature, else a usual name."""
    if override:
        if override in schema.names:
            return override, None
        return None, f"{key} = '{override}' is not a column"
    tagged = [n for n in schema.names if _kind(features.get(n)) == kind]
    if len(tagged) == 1:
        return tagged[0], None
    pool = tagged or schema.names
    for name in usual:
        if name in pool:
            return name, None
    if len(tagged) > 1:
        return None, f"several {kind} columns ({', '.join(tagged)}): choose one with {key}"
    return None, (f"no {what} column (none has the {kind} feature, none is named {' or '.join(usual)}): "
                  f"name it with {key}")


def _image_type_ok(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        i = t.get_field_index("bytes")
        return i >= 0 and (pa.types.is_binary(t.field(i).type) or pa.types.is_large_binary(t.field(i).type))
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _read_schema(path: Path, problems: list[str]) -> pa.Schema | None:
    try:
        return pq.read_schema(path)
    except Exception as err:  # pyarrow raises several types for a file that is not parquet
        problems.append(f"cannot read parquet file {path}: {str(err).splitlines()[0] if str(err) else err}")
        return None


def find_layout(root: Path, name: str, config: str = "", image_column: str = "",
                label_column: str = "") -> Layout:
    """The chosen config's split files and columns under `root`; one RaysweepError lists every problem."""
    root = Path(root)
    groups = group_files(list_parquet(root))
    chosen, problems = _choose_config(groups, config)
    files: dict[str, list[Path]] = {}
    names: dict[str, str] = {}
    columns, image, label, class_names = "unknown (no config chosen)", None, None, None
    if chosen is not None:
        group = groups[chosen]
        missing = [s for s in ("train", "test") if s not in group]
        if missing:
            where = "the top level" if chosen == TOP else f"{chosen}/"
            problems.append(f"split{'s' if len(missing) > 1 else ''} {' and '.join(repr(s) for s in missing)} "
                            f"{'are' if len(missing) > 1 else 'is'} missing "
                            f"(splits found in {where}: {', '.join(_on_disk(group))})")
        for split, aliases in SPLIT_ALIASES.items():  # canonical order: train, validation, test
            if split in group:
                names[split] = next(a for a in aliases if a in group[split])  # validation before valid, val
                files[split] = [root / p for p in group[split][names[split]]]
        first = files.get("train", next(iter(files.values())))[0]
        schema = _read_schema(first, problems)
        if schema is not None:
            columns = describe_columns(schema)
            image, label, class_names = _columns(schema, image_column, label_column, problems)
            if image and label:
                problems += _check_files(files, first, schema, image, label)
    if problems:
        raise RaysweepError(f"data source '{name}' ({root}): {'; '.join(problems)}. "
                            f"Configs seen: {describe_configs(groups)}. Columns found: {columns}")
    return Layout(config=chosen, files=files, split_names=names, image_column=image, label_column=label,
                  class_names=class_names, configs=list(groups))


def _choose_config(groups: dict, config: str) -> tuple[str | None, list[str]]:
    """data.config, else the only config there is."""
    want = config.strip().strip("/") if config else ""
    if want:
        return (want, []) if want in groups else (None, [f"no config '{want}' (data.config)"])
    if len(groups) == 1:
        return next(iter(groups)), []
    if groups:
        return None, ["several configs: choose one with data.config"]
    return None, [f"no split files ({EXPECTED})"]


def _columns(schema: pa.Schema, image_column: str, label_column: str, problems: list[str]):
    """(image column, label column, class names); None for a column with a problem (appended)."""
    features = features_of(schema)
    image, p1 = _pick(schema, features, "Image", IMAGE_NAMES, image_column, "data.image_column", "image")
    label, p2 = _pick(schema, features, "ClassLabel", LABEL_NAMES, label_column, "data.label_column", "label")
    problems += [p for p in (p1, p2) if p]
    if image and not _image_type_ok(schema.field(image).type):
        problems.append(f"image column '{image}' must be struct<bytes, path> or binary, got {schema.field(image).type}")
        image = None
    if label and not pa.types.is_integer(schema.field(label).type):
        problems.append(f"label column '{label}' must hold integers (a ClassLabel), got {schema.field(label).type}")
        label = None
    return image, label, _class_names(features.get(label)) if label else None


def _check_files(files: dict[str, list[Path]], first: Path, schema: pa.Schema, image: str, label: str) -> list[str]:
    """Every other file must carry the same two columns with the same types."""
    problems = []
    for split, paths in files.items():
        for path in paths:
            if path == first:
                continue
            other = _read_schema(path, problems)
            if other is None:
                continue
            for col in (image, label):
                if col not in other.names:
                    problems.append(f"split '{split}': {path} has no column '{col}' "
                                    f"(its columns: {', '.join(other.names)})")
                elif other.field(col).type != schema.field(col).type:
                    problems.append(f"split '{split}': column '{col}' of {path} is {other.field(col).type}, "
                                    f"not {schema.field(col).type} as in {first.name}")
    return problems


def _class_names(feature) -> list[str] | None:
    if _kind(feature) != "ClassLabel":
        return None
    names = feature.get("names")
    if names:
        return [str(n) for n in names]
    n = feature.get("num_classes")
    return [str(i) for i in range(int(n))] if isinstance(n, int) and n > 0 else None
