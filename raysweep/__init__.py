"""raysweep: how a network's error scales with training-set size, measured with Ray."""

from raysweep.errors import RaysweepError

__version__ = "0.1.0"
__all__ = ["RaysweepError", "__version__"]
