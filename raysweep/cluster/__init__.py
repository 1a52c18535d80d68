"""The cluster: start or join Ray, count and size resources, GPU memory and packing, and the preflights every training node passes."""
