"""
Probes during training: progressive sharpening and the edge of stability
========================================================================

Full-batch gradient descent with step size η on the square loss (Cohen et al., ICLR 2021): λ_max of the training
loss's Hessian rises during training until it reaches 2/η, the largest sharpness at which gradient descent is
stable, and then hovers there. ``--probe hessian:N`` measures λ_max every N optimiser steps of the run itself; the
run directory's ``probes.h5`` keeps every value beside the threshold that applies.
"""

import tempfile
from pathlib import Path

from minima import data
from minima.figures import plot_probes
from minima.files import rundir, timeline
from minima.studies.train import TrainConfig, train

work = Path(tempfile.mkdtemp(prefix="minima-gallery-"))
ds = data.synthetic(n_train=256, n_test=64, image_shape=(3, 4, 4), noise=300.0, seed=0)

# %%
# Cohen et al.'s tanh network (two hidden layers of 200), the square loss, every image in every step
# (``batch_size="full"``), plain gradient descent (no momentum), and λ_max measured every 10 steps. At the initial
# weights λ_max ≈ 2.7 on these images; the step size η = 0.5 puts the stability threshold 2/η = 4 at about 1.5
# times that (as the edge-of-stability pipeline chooses its step sizes), so the sharpening has somewhere to go
# before it meets the edge. It overshoots to about 6, the loss spikes, and λ_max falls back to hover just above 4
# while the loss keeps falling, non-monotonically: the edge of stability.
final = train(TrainConfig(model="fc_tanh", model_kwargs={"input_shape": [3, 4, 4]}, loss="mse",
                          batch_size="full", optimizer="sgd", momentum=0.0, lr=0.5, epochs=300,
                          probe=("hessian:10",), eval_test=False, progress=False, print_every=50,
                          out=str(work / "gd")), dataset=ds)

# %%
# The timeline: λ_max against 2/η, and the training loss, over the optimiser steps.
line = timeline.load(work / "gd" / "probes.h5")
metrics = rundir.RunDir(work / "gd").metrics()
values = line["hessian"]["value"]
print(f"λ_max: {values[0]:.2f} at step 0, {max(values):.2f} at most; 2/η = {2 / 0.5:g}")
fig = plot_probes(line, metrics, title="fc-tanh, square loss, full-batch GD, η = 0.5, 256 synthetic images")
