"""Curvature and sharpness: the dataset objective (f, ∇f, H·v), Hessian operators, eigenvalues / trace / density,
sharpness measures, the metric registry, convolution and graph-cache helpers."""
