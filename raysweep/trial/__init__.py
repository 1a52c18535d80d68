"""What one Train worker does: the model, metrics, the runner (optimizer, passes), data on the device, and the worker loop. Its only Ray calls are ray.train.report and checkpoints."""
