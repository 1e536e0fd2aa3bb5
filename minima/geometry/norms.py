"""Norm- and margin-based generalisation measures of a network (Jiang et al. 2020; Dziugaite et al. 2020).

Conventions (Dziugaite et al.'s ``measures.py``, the de-facto implementation of Jiang et al.'s measures):

* the network is measured as the function it computes in eval mode: every Conv/Linear → BatchNorm pair is folded
  first (:func:`minima.geometry.fold.fold_batchnorm`), and only the weights count — the ≥ 2-dimensional parameters of
  the Conv/Linear layers, not biases nor BatchNorm parameters left unfolded; ``d`` is their number of layers;
* per-layer norms are **squared**: ‖W‖²_F and ‖W‖²_2; a convolution's spectral norm is exact — the largest singular
  value of the convolution as a linear map on that layer's input size, by Sedghi et al.'s FFT (exact for a circular,
  stride-1 convolution; for zero padding or a stride it is that circular operator's norm, as in Dziugaite's code,
  whose input size is the image's for every layer where here it is each layer's own);
* the margin γ is the (m // 10)-th smallest of correct logit − largest other logit over the m training samples
  (its absolute value: a network that misclassifies that many has a negative one);
* the path norm is the sum of the outputs, on an all-ones input, of the network with every parameter squared (eval
  mode, BatchNorm folded);
* with ``adjust`` (their reporting), a measure whose name starts with ``log_`` becomes ½(v − log m) and any other
  √(v/m).

Measures (Jiang et al.'s equation numbers): ``params`` (20), ``inverse_margin`` 1/γ² (22), ``log_spec_init_main``
(29), ``log_spec_orig_main`` (30), ``log_prod_of_spec_over_margin`` (31), ``log_prod_of_spec`` (32),
``fro_over_spec`` (33), ``log_sum_of_spec_over_margin`` (34), ``log_sum_of_spec`` (35),
``log_prod_of_fro_over_margin`` (36), ``log_prod_of_fro`` (37), ``log_sum_of_fro_over_margin`` (38),
``log_sum_of_fro`` (39), ``fro_dist`` (40), ``dist_spec_init`` (41), ``param_norm`` (42), ``path_norm_over_margin``
(43), ``path_norm`` (44). The three ``*init*``/``*dist*`` ones need the initial weights. Beside them the
**Fisher–Rao norm** (Liang, Poggio, Rakhlin, Stokes 2019), ``fisher_rao`` = d² · E_x[(⟨softmax f(x), f(x)⟩ −
f_y(x))²] over the training samples, d the number of weight layers: for a bias-free ReLU network (f homogeneous of
degree d in θ) it equals E[⟨θ, ∇_θ ℓ⟩²], the norm of θ in the empirical Fisher metric; with biases or BatchNorm it is
that formula's value, not the norm. And Petzka et al.'s (2021) **relative flatness** of the feature layer,
``relative_flatness`` = Σ_{s,s′} ⟨w_s, w_s′⟩ Tr(H_{s,s′}), w_s the last layer's weights out of feature s and H_{s,s′}
the Hessian of the mean cross-entropy with respect to w_s and w_s′: for a last layer f = Wφ + b it is exactly
E_x[Σ_k p_k(1 − p_k) · ‖Wφ(x)‖²] (p = softmax f), invariant to scaling the features by c and W by 1/c.

Invariances (tested): when one layer's weights and bias are multiplied by c > 0 and the next layer's weights divided
by c (a ReLU network computes the same function), the path norm, the margin, the products of spectral or Frobenius
norms and what is built from them (``log_sum_of_*`` = log d + the mean of the logs; ``fro_over_spec``, a sum of
per-layer ratios) are unchanged; the sum of squared norms ``param_norm`` is not (nor, with the initial weights
rescaled alike, the distances to them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from minima.geometry.fold import fold_batchnorm

#: The norm-based measures that need the initial weights (``--norms-init``).
NEEDS_INIT = ("log_spec_init_main", "fro_dist", "dist_spec_init")
#: Every norm-based measure, in the order they are reported.
MEASURES = ("params", "inverse_margin", "log_spec_init_main", "log_spec_orig_main", "log_prod_of_spec_over_margin",
            "log_prod_of_spec", "fro_over_spec", "log_sum_of_spec_over_margin", "log_sum_of_spec",
            "log_prod_of_fro_over_margin", "log_prod_of_fro", "log_sum_of_fro_over_margin", "log_sum_of_fro",
            "fro_dist", "dist_spec_init", "param_norm", "path_norm_over_margin", "path_norm", "fisher_rao",
            "relative_flatness")


def weight_layers(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, torch.Tensor, tuple[int, ...]]]:
    """(name, weight, spatial input size) of every Conv2d/Linear layer of the BatchNorm-folded eval-mode ``model``,
    in forward order (a Linear layer's spatial size is ``()``)."""
    folded = fold_batchnorm(model)
    seen: list[tuple[str, torch.Tensor, tuple[int, ...]]] = []
    hooks = []
    for name, module in folded.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            def hook(mod: nn.Module, args: tuple, _out: object, name: str = name) -> None:
                spatial = tuple(args[0].shape[2:]) if isinstance(mod, nn.Conv2d) else ()
                seen.append((name, mod.weight.detach(), spatial))
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            folded(torch.zeros(1, *input_shape, dtype=next(folded.parameters()).dtype))
    finally:
        for h in hooks:
            h.remove()
    return seen


def spectral_norm(weight: torch.Tensor, spatial: Sequence[int] = ()) -> float:
    """The largest singular value of a Linear weight, or of a Conv2d kernel (out, in, kh, kw) as the circular
    convolution on inputs of ``spatial`` size (Sedghi, Gupta, Long 2019: the singular values of the FFT of the
    kernel at every frequency), in float64."""
    w = weight.detach().to(torch.float64).cpu()
    if w.dim() == 2:
        return float(torch.linalg.matrix_norm(w, ord=2))
    kernel = np.einsum("oihw->hwio", w.numpy())
    transforms = np.fft.fft2(kernel, tuple(spatial), axes=(0, 1))  # (h, w, in, out)
    return float(np.linalg.svd(transforms, compute_uv=False).max())


def logit_terms(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """In one pass over ``batches`` (eval mode; float64 on the CPU), every sample's margin — correct logit − largest
    other logit — and its Fisher–Rao term (⟨softmax f(x), f(x)⟩ − f_y(x))²."""
    was = model.training
    model.eval()
    margin_parts, fisher_parts = [], []
    try:
        with torch.no_grad():
            for x, y in batches:
                logits = model(x).to(torch.float64)
                correct = logits.gather(1, y.view(-1, 1)).squeeze(1)
                others = logits.scatter(1, y.view(-1, 1), float("-inf")).max(dim=1).values
                margin_parts.append((correct - others).cpu())
                fisher_parts.append(((torch.softmax(logits, dim=1) * logits).sum(dim=1) - correct).pow(2).cpu())
    finally:
        model.train(was)
    return torch.cat(margin_parts), torch.cat(fisher_parts)


def margins(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Correct logit − largest other logit of every sample (:func:`logit_terms`)."""
    return logit_terms(model, batches)[0]


def fisher_rao_terms(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """(⟨softmax f(x), f(x)⟩ − f_y(x))² of every sample (:func:`logit_terms`)."""
    return logit_terms(model, batches)[1]


def relative_flatness_terms(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Σ_k p_k(1 − p_k) · ‖Wφ(x)‖² of every sample, φ the input of the network's last Linear layer and W its weight
    (the folded eval-mode network; float64 on the CPU)."""
    folded = fold_batchnorm(model)
    last = [m for m in folded.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError("relative flatness needs a last Linear layer (the feature layer's weights)")
    features: list[torch.Tensor] = []
    hook = last[-1].register_forward_hook(lambda _m, args, _out: features.append(args[0].detach()))
    out = []
    try:
        with torch.no_grad():
            for x, _ in batches:
                features.clear()
                p = torch.softmax(folded(x).to(torch.float64), dim=1)
                wphi = features[-1].to(torch.float64) @ last[-1].weight.detach().to(torch.float64).T
                out.append(((p * (1 - p)).sum(dim=1) * wphi.pow(2).sum(dim=1)).cpu())
    finally:
        hook.remove()
    return torch.cat(out)


def margin(values: torch.Tensor) -> float:
    """γ: the absolute value of the (m // 10)-th smallest margin (at least the first)."""
    k = max(len(values) // 10, 1)
    return abs(float(torch.kthvalue(values, k).values))


def path_norm(model: nn.Module, input_shape: Sequence[int]) -> float:
    """Σ outputs of the folded eval-mode network with every parameter squared, on an all-ones input."""
    squared = fold_batchnorm(model)
    with torch.no_grad():
        for p in squared.parameters():
            p.pow_(2)
        return float(squared(torch.ones(1, *input_shape, dtype=next(squared.parameters()).dtype)).sum())


def measures(model: nn.Module, input_shape: Sequence[int], margin_values: torch.Tensor,
             init: nn.Module | None = None, adjust: bool = True, fisher_rao_mean: float | None = None,
             relative_flatness_mean: float | None = None) -> dict[str, float]:
    """Every measure of :data:`MEASURES` (those of :data:`NEEDS_INIT` only with ``init``, a model of the same
    architecture at its initial weights; ``fisher_rao`` and ``relative_flatness`` only with the means of
    :func:`fisher_rao_terms` and :func:`relative_flatness_terms`); ``margin_values`` are the training samples'
    margins (:func:`margins`)."""
    layers = weight_layers(model, input_shape)
    d, m = len(layers), len(margin_values)
    fro = np.array([float(w.to(torch.float64).pow(2).sum()) for _, w, _ in layers])
    spec = np.array([spectral_norm(w, s) ** 2 for _, w, s in layers])
    gamma = margin(margin_values)
    log_gamma2 = 2.0 * math.log(gamma) if gamma > 0 else math.inf
    out: dict[str, float] = {"params": float(sum(w.numel() for _, w, _ in layers))}
    out["inverse_margin"] = 1.0 / gamma ** 2 if gamma > 0 else math.inf
    out["log_prod_of_spec"] = float(np.log(spec).sum())
    out["log_prod_of_spec_over_margin"] = out["log_prod_of_spec"] - log_gamma2
    out["fro_over_spec"] = float((fro / spec).sum())
    out["log_spec_orig_main"] = out["log_prod_of_spec_over_margin"] + math.log(out["fro_over_spec"])
    out["log_sum_of_spec_over_margin"] = math.log(d) + out["log_prod_of_spec_over_margin"] / d
    out["log_sum_of_spec"] = math.log(d) + out["log_prod_of_spec"] / d
    out["log_prod_of_fro"] = float(np.log(fro).sum())
    out["log_prod_of_fro_over_margin"] = out["log_prod_of_fro"] - log_gamma2
    out["log_sum_of_fro_over_margin"] = math.log(d) + out["log_prod_of_fro_over_margin"] / d
    out["log_sum_of_fro"] = math.log(d) + out["log_prod_of_fro"] / d
    out["param_norm"] = float(fro.sum())
    out["path_norm"] = path_norm(model, input_shape)
    out["path_norm_over_margin"] = out["path_norm"] / gamma ** 2 if gamma > 0 else math.inf
    if fisher_rao_mean is not None:
        out["fisher_rao"] = d ** 2 * fisher_rao_mean
    if relative_flatness_mean is not None:
        out["relative_flatness"] = relative_flatness_mean
    if init is not None:
        first = weight_layers(init, input_shape)
        if [w.shape for _, w, _ in first] != [w.shape for _, w, _ in layers]:
            raise ValueError("the initial weights are not of the same architecture as the measured network")
        diff = [(w.to(torch.float64) - w0.to(torch.float64), s) for (_, w, s), (_, w0, _) in zip(layers, first,
                                                                                                 strict=True)]
        dist_fro = np.array([float(dw.pow(2).sum()) for dw, _ in diff])
        out["fro_dist"] = float(dist_fro.sum())
        out["dist_spec_init"] = float(sum(spectral_norm(dw, s) ** 2 for dw, s in diff))
        out["log_spec_init_main"] = out["log_prod_of_spec_over_margin"] + math.log(float((dist_fro / spec).sum()))
    if adjust:
        out = {k: (0.5 * (v - math.log(m)) if k.startswith("log_") else math.sqrt(v / m)) for k, v in out.items()}
    return out
