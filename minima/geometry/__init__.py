"""Points in weight space and their exact evaluation: segments, planes and random directions, the evaluation spec,
exact loss and accuracy, BatchNorm re-estimation and folding."""
