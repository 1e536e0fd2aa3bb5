"""minima — sharp vs flat minima: train small/large-batch checkpoints, interpolate, measure sharpness."""

__version__ = "0.1.0"
