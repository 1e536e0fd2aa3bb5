"""
λ_max, the trace and the spectral density of the Hessian
========================================================

The Hessian H of the training loss at a minimum, through Hessian-vector products only: its largest eigenvalues by
Lanczos (with residual error bounds), its trace by Hutch++, and its eigenvalue density by stochastic Lanczos
quadrature. On a network this small the dense Hessian fits in memory, so the example also checks the top
eigenvalue against ``numpy.linalg.eigvalsh`` of the dense matrix.
"""

import tempfile
from pathlib import Path

import numpy as np
import torch

from minima import data
from minima.curvature.hessian import hessian_operator, hutchpp_trace, spectral_density, top_eigenvalues
from minima.curvature.objective import DatasetObjective, FixedBatches
from minima.figures import plot_density
from minima.files import checkpoint
from minima.geometry.evaluate import Batching
from minima.studies.train import TrainConfig, train

work = Path(tempfile.mkdtemp(prefix="minima-gallery-"))
ds = data.synthetic(n_train=512, n_test=256, image_shape=(3, 4, 4), noise=300.0, seed=0)
final = train(TrainConfig(model="mlp", model_kwargs={"input_shape": [3, 4, 4], "widths": [16]}, epochs=20,
                          batch_size=32, lr=3e-3, progress=False, out=str(work / "run")), dataset=ds)
model, _ = checkpoint.load_model(final)

# %%
# The objective: the mean cross-entropy over the 512 training images, fixed batches, float64.
batches = FixedBatches.from_split(ds.train, ds.mean, ds.std, Batching(batch_size=512, dtype=torch.float64))
objective = DatasetObjective(model, batches)
op = hessian_operator(objective)
print(f"{op.shape[0]} parameters, f = {objective.value():.4f}")

top = top_eigenvalues(op, k=3, seed=0)
trace = hutchpp_trace(op, products=60, seed=0)
print("λ_1..3 =", np.round(top.eigenvalues, 4), "± residual bounds", np.round(top.residuals, 6),
      f"({top.hvps} products)")
print(f"trace ≈ {trace.trace:.3f} ± {trace.stderr:.3f} (Hutch++, {trace.hvps} products)")

# %%
# The dense check: H built column by column from the same products, then ``eigvalsh``.
dense = np.stack([op.matvec(e) for e in np.eye(op.shape[0])])
exact = np.linalg.eigvalsh((dense + dense.T) / 2)
print(f"dense: λ_max {exact[-1]:.6f}, trace {exact.sum():.3f}; Lanczos λ_max {top.eigenvalues[0]:.6f}")

# %%
# The density: 4 Lanczos probes of 30 steps, each Ritz value broadened into a Gaussian.
density = spectral_density(op, steps=30, probes=4, seed=0)
fig = plot_density([{"checkpoint_label": "run", "nodes": density.nodes, "weights": density.weights,
                      "probes": density.probes, "steps": density.steps, "dimension": op.shape[0],
                      "bn_mode": "eval", "train_samples": len(ds.train)}])
