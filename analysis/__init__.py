"""Analysis of raysweep experiments: tidy results, power-law fits, figures and reports."""
