"""Everything a trial needs from its data: sources and layouts, the one-time decode cache, subsets."""

from raysweep.data.cache import PreparedData
from raysweep.data.decode import fast_square, pil_square
from raysweep.data.prepare import prepare, prepare_from_config
from raysweep.data.source import SPLITS, Source, builtin_names, check_local_source, resolve_source
from raysweep.data.subsets import carve_validation, stratified_subset

__all__ = ["PreparedData", "SPLITS", "Source", "builtin_names", "carve_validation", "check_local_source",
           "fast_square", "pil_square", "prepare", "prepare_from_config", "resolve_source", "stratified_subset"]
