"""Everything a trial needs from its data: sources, the one-time decode cache, and subsets."""

from raysweep.data.prepare import PreparedData, fast_square, pil_square, prepare, prepare_from_config
from raysweep.data.source import SPLITS, Source, resolve_source
from raysweep.data.subsets import stratified_subset

__all__ = ["PreparedData", "SPLITS", "Source", "fast_square", "pil_square", "prepare",
           "prepare_from_config", "resolve_source", "stratified_subset"]
