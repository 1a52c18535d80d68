"""Benchmarks measured side by side in one run: `python -m raysweep.bench prepare|train`."""
