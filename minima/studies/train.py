"""Training study: the training loop of ``python -m minima.train`` (single process or ``torchrun`` DDP).

Semantics (each stated so a reader can check them against the papers):

* **Global batch** ``B`` is the configured quantity. Each rank takes ``B / world_size`` samples per step;
  if that exceeds ``micro_batch`` the rank accumulates gradients over ``B / (world_size · micro_batch)``
  micro-batches (DDP's ``no_sync`` on all but the last). The loss of a micro-batch is its *sum* of
  per-sample cross-entropies times ``world_size / B``: DDP averages gradients over ranks, so one optimiser
  step equals the single-process step on the full batch of ``B`` samples.
* **BatchNorm** statistics are computed per micro-batch (Goyal's per-worker BN); ``sync_bn`` converts to
  ``SyncBatchNorm`` under DDP (still per micro-batch when accumulating).
* **Epochs**: one permutation per epoch, identical on every rank (seeded by ``(seed, epoch)``), cut into
  global batches; each rank takes its contiguous slice of every global batch. The incomplete final batch
  is dropped, so every step has exactly ``B`` samples.
* **Randomness** (dropout, augmentation) is re-seeded at every step from ``(seed, step, rank)``: resuming
  at any step reproduces the uninterrupted run bit for bit on the same machine, with no RNG state to save.
* **Train metrics** in ``metrics.jsonl`` are exact running sums over the epoch's training samples (train
  mode: dropout on, BN batch statistics), reduced across ranks and divided by the sample count.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn
from tqdm.auto import tqdm

from minima import data as data_mod
from minima.core import config as cfg
from minima.core import distributed
from minima.core.cli import duration
from minima.core.config import setting
from minima.core.options import DataOptions
from minima.core.precision import Float32Math, float32_math
from minima.core.precision import effective as precision_effective
from minima.core.vocab import (
    Amp,
    BNMode,
    DataOnDevice,
    DeviceName,
    FullBatch,
    Loss,
    Optimizer,
    SamBase,
    Sink,
    check_choice,
)
from minima.curvature.probes import parse_probes
from minima.files import checkpoint as ckpt_io
from minima.files.checkpoint import RESUMABLE_CHANGES
from minima.files.rundir import RunDir
from minima.files.sinks import check_sinks, epoch_values, open_sinks
from minima.geometry.evaluate import (
    Batching,
    batch_sums,
    check_model_accepts,
    evaluate,
    per_sample_loss,
    sums_to_result,
)
from minima.models import (
    available_models,
    default_data,
    instantiate,
    is_convolutional,
    load_imagenet_weights,
    model_info,
    model_kind,
    own_import,
    resolve_model,
)
from minima.optim import sam as sam_mod
from minima.optim.schedule import LRSchedule, ScalingRule, ScheduleKind, build_schedule, learning_rate
from minima.optim.steps import TrainingInterrupted, stop_on_signals
from minima.studies.loop import NonFiniteLossError, Plan, TrainState, epoch_batches, plan_batches, run_epoch
from minima.studies.probing import ProbeCallback, ProbeSettings

#: Images the probes measure on when --probe-subset is not given.
DEFAULT_PROBE_SUBSET = 1000


@dataclass(frozen=True)
class TrainConfig(DataOptions):
    """Every setting of a training run, with units (the data options shared with every command that reads data,
    :class:`minima.core.options.DataOptions`, plus training's own). Stored in each checkpoint and in
    ``config.json``."""

    model: str = setting("c1", f"model: one of {available_models()}, torchvision:NAME (e.g. torchvision:resnet18) "
                         "or package.module:factory (your own; naming it here allows importing it)")
    model_kwargs: dict = setting(help="extra model arguments", factory=dict)
    data: str | None = setting(None, "synthetic[:N_TRAIN[/N_TEST]] (seeded, 2048/512 images by default), "
                               "torchvision:NAME (CIFAR10, CIFAR100, MNIST, FashionMNIST, SVHN), imagefolder:PATH, "
                               "npz:PATH, or a path (.npz file or CIFAR-10 directory)",
                               default_text="the model's own data (c3/c4: CIFAR-100), else $MINIMA_DATA, else "
                               "the torchvision CIFAR-10 download")
    epochs: int = setting(20, "maximum number of epochs")
    batch_size: int | FullBatch = setting(256, "global batch size: samples per optimiser step over all ranks, "
                                                "or full (full-batch gradient descent: every training image each "
                                                "step, accumulated over --micro-batch chunks)", unit="samples")
    micro_batch: int | None = setting(None, "largest per-rank forward batch; gradients are accumulated above it",
                                      unit="samples", default_text="the per-rank batch")
    optimizer: Optimizer = setting("adam", "optimiser: adam, sgd, or sharpness-aware minimisation around --sam-base: "
                                   "sam (Foret et al.) or asam (Kwon et al.'s scale-invariant SAM)")
    loss: Loss = setting("cross_entropy", "training loss: cross_entropy, or mse = ½ Σ_k (f_k − onehot_k)² per sample "
                         "(Cohen et al.'s square loss); recorded in every checkpoint, and every analysis of the "
                         "checkpoints (curves, surfaces, sharpness, curvature) uses it")
    lr: float = setting(1e-3, "reference learning rate at --ref-batch")
    ref_batch: int = setting(256, "batch size at which --lr was tuned", unit="samples")
    scaling: ScalingRule = setting("none", "LR scaling rule from --ref-batch to --batch-size")
    warmup_epochs: float = setting(0.0, "gradual warmup length (per iteration, from --lr)", unit="epochs")
    schedule: ScheduleKind = setting("constant", "LR schedule after warmup")
    milestones: tuple[float, ...] = setting((), "epochs at which the step schedule multiplies the LR by --gamma",
                                            unit="epochs")
    gamma: float = setting(0.1, "step-decay factor")
    momentum: float = setting(0.9, "SGD momentum")
    nesterov: bool = setting(False, "Nesterov momentum (SGD)")
    weight_decay: float = setting(0.0, "L2 weight decay coefficient")
    decay_bn_bias: bool = setting(False, "also apply weight decay to BatchNorm and bias parameters (Goyal: no)")
    adam_betas: tuple[float, ...] = setting((0.9, 0.999), "Adam betas")
    adam_eps: float = setting(1e-8, "Adam epsilon")
    sam_rho: float | None = setting(None, "SAM/ASAM neighbourhood radius ρ. sam: the weights are perturbed by "
                                    "ε = ρ·g/‖g‖ before the gradient is taken, a step of length ρ in parameter "
                                    "units; asam: by ε = ρ·T²g/‖Tg‖ with T = |w| + --asam-eta, a step of length ρ "
                                    "measured relative to each weight's magnitude (‖T⁻¹ε‖ = ρ)",
                                    default_text="0.05 for sam, 2.0 for asam (davda54/sam's recommendations)")
    sam_base: SamBase = setting("sgd", "the optimiser SAM/ASAM steps with, using the gradient at the perturbed "
                                "weights (its own flags apply: --momentum, --weight-decay, --adam-betas, the LR "
                                "schedule)")
    asam_eta: float = setting(0.0, "ASAM's η in T = |w| + η (davda54/sam: 0; Kwon et al.'s code: 0.01)")
    swa_start: int | None = setting(None, "stochastic weight averaging: after this many epochs the LR becomes "
                                    "--swa-lr and the weights at the end of every later epoch are averaged into "
                                    "swa.pt (BatchNorm statistics recomputed on the training data)", unit="epochs",
                                    default_text="no SWA")
    swa_lr: float | None = setting(None, "the learning rate during SWA (Izmailov et al.: a constant, high one)",
                                   default_text="required with --swa-start")
    swa_anneal_epochs: int = setting(0, "cosine annealing from the LR at --swa-start to --swa-lr over this many "
                                     "epochs (torch's SWALR); 0 switches at once", unit="epochs")
    augment: bool = setting(False, "random crop (pad 4) + horizontal flip")
    cutout: int = setting(0, "Cutout (DeVries & Taylor): one square of this side per training image, centred on a "
                          "random pixel, set to the data's mean after normalisation (16 for CIFAR-10; 0: none)",
                          unit="pixels")
    cutout_p: float = setting(1.0, "the probability that a training image gets its Cutout square (DeVries & Taylor: "
                              "1; davda54/sam's recipe: 0.5)")
    label_smoothing: float = setting(0.0, "label smoothing of the training loss (cross_entropy only; the loss every "
                                     "evaluation, metric and analysis reports stays the plain cross-entropy)")
    seed: int = setting(0, "seed of shuffling, dropout and augmentation")
    init_seed: int | None = setting(None, "seed of the initial weights; equal values give SB and LB the same x0",
                                    default_text="--seed")
    init_from: str | None = setting(None, "start from this checkpoint's weights", default_text="fresh weights")
    pretrained: str | None = setting(None, "mobilenet_v2 only: 'imagenet' (torchvision download) or a local "
                                     "ImageNet state-dict file", default_text="none")
    target_loss: float | None = setting(None, "stop once the epoch's training loss is at or below this",
                                        unit="nats", default_text="no target")
    target_accuracy: float | None = setting(None, "stop once the epoch's training accuracy is at or above this "
                                            "(a fraction, e.g. 0.99: Cohen et al.'s goal)", default_text="no target")
    patience: int | None = setting(None, "stop after this many epochs without a training-loss improvement of at "
                                   "least --min-delta", unit="epochs", default_text="never")
    min_delta: float = setting(1e-4, "smallest training-loss decrease that counts", unit="nats")
    channels_last: bool | None = setting(None, "channels_last memory format",
                                         default_text="on for convolutional models")
    amp: Amp = setting("none", "bf16: CUDA autocast")
    data_on_device: DataOnDevice = setting("auto", "keep the data on the compute device (auto: when it takes at most "
                                           "half its free memory) or in pinned host memory (no); a CPU is always "
                                           "its own host")
    float32_math: Float32Math = setting("default", "float32 matmuls/convolutions on CUDA: fp32 (TF32 off), tf32, or "
                                        "default (PyTorch's own flags); recorded in every checkpoint")
    threads: int | None = setting(None, "torch CPU threads", default_text="torch's default")
    sync_bn: bool = setting(False, "SyncBatchNorm under DDP")
    out: str = setting("runs/run", "run directory")
    save_every: int = setting(0, "also keep epoch_XXXX.pt every K epochs (0: never)", unit="epochs")
    probe: tuple[str, ...] = setting((), "curvature probes during training, NAME or NAME:EVERY with EVERY in "
                                     "steps (50) or epochs (2epochs); NAME a metric of minima.sharpness, e.g. "
                                     "hessian, trace, or preconditioned: Adam's P^-1/2 H P^-1/2; written to "
                                     "probes.h5 in the run directory", default_text="none")
    probe_every: int = setting(100, "default period of the probes (after steps K, 2K, … and the last)", unit="steps")
    probe_subset: int | None = setting(None, "stratified training images the probes measure on (no augmentation); "
                                       "a value above the training set's size is refused", unit="samples",
                                       default_text=f"{DEFAULT_PROBE_SUBSET}, or every training image when fewer")
    probe_bn_mode: BNMode = setting("eval", "BatchNorm inside the probes' loss: eval or batch")
    probe_topk: int = setting(1, "eigenvalues the hessian and preconditioned probes record")
    probe_warm_start: bool = setting(True, "start the hessian and preconditioned probes' Lanczos from their previous "
                                     "top vector (the same tolerance, fewer Hessian-vector products; kept in last.pt)")
    log: tuple[Sink, ...] = setting((), "tracking sinks the epoch metrics and probe values are mirrored to: "
                                    "tensorboard (RUN/tensorboard), wandb (WANDB_MODE=offline keeps it on disk), "
                                    "mlflow ($MLFLOW_TRACKING_URI, else the file: store RUN/mlruns); each an "
                                    "optional extra, e.g. pip install 'minima[tensorboard]'", default_text="none")
    eval_test: bool = setting(True, "evaluate the test set after every epoch")
    progress: bool = setting(True, "tqdm progress bar on rank 0")
    print_every: int = setting(1, "print the epoch's line every K epochs (and the last one, and the one the stopping "
                               "rule ends on); metrics.jsonl keeps every epoch", unit="epochs")


def validate_config(c: TrainConfig) -> None:
    """Refuse settings that name unknown choices or make no sense, before any work starts."""
    for key, vocabulary in (("optimizer", Optimizer), ("scaling", ScalingRule), ("schedule", ScheduleKind),
                            ("amp", Amp), ("device", DeviceName), ("loss", Loss)):
        check_choice(key, getattr(c, key), vocabulary)
    if model_kind(c.model) == "registry":
        model_info(c.model)
    if c.epochs < 1:
        raise ValueError(f"epochs must be ≥ 1; got {c.epochs}")
    if c.batch_size != "full" and (not isinstance(c.batch_size, int) or c.batch_size < 1):
        raise ValueError(f"--batch-size must be a number ≥ 1 or full; got {c.batch_size!r}")
    if c.lr <= 0:
        raise ValueError(f"lr must be > 0; got {c.lr}")
    if c.warmup_epochs < 0 or c.warmup_epochs > c.epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={c.epochs}]; got {c.warmup_epochs}")
    if c.probe:
        parse_probes(c.probe, c.probe_every, base_optimizer(c))
        check_choice("probe BatchNorm mode (--probe-bn-mode)", c.probe_bn_mode, BNMode)
        if (c.probe_subset is not None and c.probe_subset < 1) or c.probe_topk < 1:
            raise ValueError("--probe-subset and --probe-topk must be ≥ 1")
    check_sinks(c.log)
    if c.target_accuracy is not None and not 0 < c.target_accuracy <= 1:
        raise ValueError(f"--target-accuracy is a fraction in (0, 1]; got {c.target_accuracy} (99 % is 0.99)")
    _validate_flat(c)
    if c.print_every < 1:
        raise ValueError(f"--print-every must be ≥ 1 epoch; got {c.print_every}")
    if not 0 < c.cutout_p <= 1:
        raise ValueError(f"--cutout-p is a probability in (0, 1]; got {c.cutout_p}")
    if c.cutout < 0 or not 0 <= c.label_smoothing < 1:
        raise ValueError(f"--cutout must be ≥ 0 and --label-smoothing in [0, 1); got {c.cutout}, {c.label_smoothing}")
    if c.label_smoothing and c.loss != "cross_entropy":
        raise ValueError("--label-smoothing applies to --loss cross_entropy only")
    if c.schedule == "step" and not c.milestones:
        raise ValueError("schedule 'step' needs --milestones (epochs at which the LR is multiplied by --gamma)")


SAM_RHO = {"sam": 0.05, "asam": 2.0}  # davda54/sam's recommended radii (WideResNet on CIFAR-10)


def _validate_flat(c: TrainConfig) -> None:
    """SAM/ASAM and SWA settings: refused where the optimiser or the run cannot honour them."""
    check_choice("SAM base optimiser (--sam-base)", c.sam_base, SamBase)
    sam = c.optimizer in SAM_RHO
    if not sam and (c.sam_rho is not None or c.sam_base != "sgd"):
        raise ValueError(f"--sam-rho and --sam-base apply to --optimizer sam or asam, not {c.optimizer!r}; drop them "
                         "or choose sam/asam")
    if c.asam_eta != 0 and c.optimizer != "asam":
        raise ValueError("--asam-eta applies to --optimizer asam only; drop it or choose asam")
    if (c.sam_rho is not None and c.sam_rho < 0) or c.asam_eta < 0:
        raise ValueError(f"--sam-rho and --asam-eta must be ≥ 0; got {c.sam_rho}, {c.asam_eta}")
    if c.swa_start is None:
        if c.swa_lr is not None or c.swa_anneal_epochs:
            raise ValueError("--swa-lr and --swa-anneal-epochs need --swa-start (the epoch averaging starts after)")
        return
    if not 0 <= c.swa_start < c.epochs:
        raise ValueError(f"--swa-start must be in [0, epochs={c.epochs}) so that some epoch is averaged; got "
                         f"{c.swa_start}")
    if c.swa_lr is None or c.swa_lr <= 0:
        raise ValueError(f"--swa-start needs --swa-lr > 0 (the learning rate while averaging); got {c.swa_lr}")
    if c.swa_anneal_epochs < 0:
        raise ValueError(f"--swa-anneal-epochs must be ≥ 0; got {c.swa_anneal_epochs}")


def with_sam_default(c: TrainConfig) -> TrainConfig:
    """The config with SAM/ASAM's radius filled in when it was left out (what the run records and a resume compares)."""
    if c.optimizer in SAM_RHO and c.sam_rho is None:
        return replace(c, sam_rho=SAM_RHO[c.optimizer])
    return c


def base_optimizer(c: TrainConfig) -> str:
    """The optimiser that takes the steps: ``--sam-base`` under SAM/ASAM, else ``--optimizer``."""
    return c.sam_base if c.optimizer in SAM_RHO else c.optimizer


def load_dataset(c: TrainConfig) -> data_mod.Dataset:
    """The dataset named by the config (or the model's own, for c3/c4), with its stratified subsets taken."""
    source = c.data if c.data is not None else default_data(c.model)
    ds = data_mod.load_source(source, root=c.data_root)
    return ds.subset(c.train_subset, c.test_subset, c.subset_seed, mode=c.subset_mode)


def _param_groups(model: nn.Module, weight_decay: float, decay_bn_bias: bool) -> list[dict[str, Any]]:
    # One-dimensional parameters are biases and BatchNorm scales/shifts (Goyal: no weight decay on them).
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if decay_bn_bias or p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, c: TrainConfig) -> torch.optim.Optimizer:
    """The base optimiser of ``c`` (Adam or SGD) over the model's parameter groups (weight decay off BN and biases)."""
    groups = _param_groups(model, c.weight_decay, c.decay_bn_bias)
    if base_optimizer(c) == "adam":
        return torch.optim.Adam(groups, lr=c.lr, betas=tuple(c.adam_betas), eps=c.adam_eps)
    return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov)


def _initial_model(c: TrainConfig, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    kwargs = dict(c.model_kwargs)
    torch.manual_seed(c.seed if c.init_seed is None else c.init_seed)
    # Naming an import-path model in the training config is the user's permission to import its module.
    factory, stored_kwargs = resolve_model(c.model, num_classes, trusted=own_import(c.model), **kwargs)
    model = instantiate(c.model, factory, stored_kwargs)  # stored_kwargs are what rebuilds it from the checkpoint
    if c.pretrained:
        if c.model != "mobilenet_v2":
            raise ValueError(f"--pretrained is available for mobilenet_v2 only, not {c.model!r}")
        load_imagenet_weights(model, c.pretrained)
    if c.init_from:
        init = ckpt_io.load_checkpoint(c.init_from)  # weights only: the model is this run's
        if init["model"]["name"] != c.model:
            raise ValueError(f"--init-from {c.init_from} holds a {init['model']['name']!r} model, this run trains "
                             f"{c.model!r}; pass --model {init['model']['name']} or another checkpoint")
        ckpt_io.check_same_layout(init["state_dict"], model.state_dict(), c.init_from, "this run's model")
        model.load_state_dict(init["state_dict"])
    return model, stored_kwargs


@dataclass
class Run:
    """One training run in progress: its fixed parts (config, data, plan, model, optimiser) and its position
    (epoch, batch within it, optimiser step, elapsed seconds, running sums of an interrupted epoch, stopping-rule
    state, the last epoch's metrics)."""

    c: TrainConfig
    env: distributed.DistEnv
    ds: data_mod.Dataset
    plan: Plan
    schedule: LRSchedule
    model: nn.Module
    net: nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    model_kwargs: dict[str, Any]
    channels_last: bool
    resolved: dict[str, Any]
    train_split: data_mod.Split  # where the loop reads batches from (the device, or pinned host memory)
    test_split: data_mod.Split
    placement: data_mod.Placement
    epoch: int = 0
    batch0: int = 0
    step: int = 0
    elapsed: float = 0.0
    carried: torch.Tensor = field(default_factory=lambda: torch.zeros(4, dtype=torch.float64))
    trainer: dict[str, Any] = field(default_factory=lambda: {"best_loss": float("inf"), "bad_epochs": 0,
                                                              "stopped": None})
    last_metrics: dict[str, Any] = field(default_factory=dict)
    probes: ProbeCallback | None = None  # the run's curvature probes (minima.studies.probing)
    swa: AveragedModel | None = None  # the running average of the weights after --swa-start
    sinks: list = field(default_factory=list)  # rank 0: the tracking sinks (minima.files.sinks)
    fetched: Any = None  # the current epoch's micro-batches (an iterator)
    t0: float = 0.0  # when the current epoch (or its resumed part) started

    @property
    def run_dir(self) -> Path:
        """The run directory."""
        return Path(self.c.out)

    @property
    def files(self) -> RunDir:
        """The run directory as a :class:`~minima.files.rundir.RunDir`."""
        return RunDir(self.c.out)

    @property
    def last_path(self) -> Path:
        """The path of the run's ``last.pt``."""
        return self.files.last

    def checkpoint(self, kind: str, epoch_sums: torch.Tensor | None = None,
                   position: dict[str, Any] | None = None, weights: nn.Module | None = None,
                   metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        """A checkpoint of the current weights (or of ``weights``, with ``metrics``: the SWA average);
        ``kind="resume"`` adds what continuing needs."""
        meta = ckpt_io.make_meta(
            epoch=position["epoch"] if position else self.epoch, step=self.step, global_batch_size=self.c.batch_size,
            world_size=self.env.world_size, seed=self.c.seed, train_config=self.resolved, data=self.ds.describe(),
            metrics=self.last_metrics if metrics is None else metrics,
            # found by check_model_accepts' dry forward: the data's image shape, the model's outputs
            model_info={"input_shape": list(self.ds.image_shape), "num_classes": self.ds.num_classes,
                        "convolutional": is_convolutional(self.model)},
            precision=precision_effective(self.env.device, self.c.float32_math,
                                          "bfloat16" if self.c.amp == "bf16" else None),
            data_placement=self.placement.describe(),
        )
        extra: dict[str, Any] = {}
        if kind == "resume":
            extra = {"optimizer": self.optimizer.state_dict(),
                     "scheduler": {"step": self.step, **asdict(self.schedule)},
                     "rng": {"scheme": "torch.manual_seed(f(seed, step, rank)) before every step"},
                     "position": position, "epoch_sums": epoch_sums, "trainer": dict(self.trainer)}
            if self.probes is not None:  # the probes' warm starts: a resume starts from them too
                extra.update(self.probes.resume_state())
            if self.swa is not None:
                extra["swa"] = self.swa.state_dict()
        state = (self.model if weights is None else weights).state_dict()
        return ckpt_io.make_checkpoint(self.c.model, self.model_kwargs, state, meta, **extra)

    # the one training loop's task (minima.studies.loop.Task)
    @property
    def seed(self) -> int:
        """The seed of the data order and augmentation."""
        return self.c.seed

    @property
    def epochs(self) -> int:
        """The epoch cap."""
        return self.c.epochs

    def train_step(self, batch: int, seed: int, sums: torch.Tensor) -> None:
        """One optimiser step over the global batch: the rank's micro-batches (gradients accumulated, DDP's
        ``no_sync`` on all but the last), each augmented on the device from the step's seed, normalised, its loss
        the sum of per-sample losses × world size / global batch.

        SAM/ASAM (:mod:`minima.optim.sam`): that first pass takes each rank's own gradient (no all-reduce: under DDP
        every rank perturbs by its own batch's gradient, Foret et al.'s m-sharpness with m the per-rank batch), the
        weights move to θ + ε, a second pass over the same inputs — BatchNorm running statistics frozen — takes the
        all-reduced gradient there, θ is restored and the base optimiser steps. The recorded loss is the first
        pass's, at θ."""
        c, plan = self.c, self.plan
        aug_gen = torch.Generator().manual_seed(seed)  # crop offsets and flips drawn on the host from the step's seed
        sam = c.optimizer in SAM_RHO
        self.optimizer.zero_grad(set_to_none=True)
        inputs = []
        for m in range(plan.accumulation):
            x, y = next(self.fetched)
            if c.augment:
                x = data_mod.augment(x, aug_gen)
            x = data_mod.normalize(x, self.ds.mean, self.ds.std, torch.float32, self.channels_last)
            if c.cutout:
                x = data_mod.cutout(x, c.cutout, aug_gen, c.cutout_p)
            if sam:
                inputs.append((x, y))
            logits = self._backward(x, y, sync=not sam and m == plan.accumulation - 1)
            sums += batch_sums(logits.detach().float(), y, c.loss)
        if sam:
            params = [p for p in self.model.parameters() if p.requires_grad]
            saved = sam_mod.ascent(params, float(c.sam_rho), adaptive=c.optimizer == "asam", eta=c.asam_eta)
            self.optimizer.zero_grad(set_to_none=True)
            with sam_mod.frozen_running_stats(self.model):
                for m, (x, y) in enumerate(inputs):
                    self._backward(x, y, sync=m == len(inputs) - 1)
            sam_mod.restore(saved)
        self.optimizer.step()

    def _backward(self, x: torch.Tensor, y: torch.Tensor, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; under DDP the gradients are all-reduced only when ``sync``.
        Returns the logits."""
        c, env = self.c, self.env
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if c.amp == "bf16" else contextlib.nullcontext()
        with contextlib.nullcontext() if not env.distributed or sync else self.net.no_sync():
            with autocast:
                logits = self.net(x)
            summed = (F.cross_entropy(logits.float(), y, reduction="sum", label_smoothing=c.label_smoothing)
                      if c.loss == "cross_entropy" else per_sample_loss(logits.float(), y, c.loss).sum())
            (summed * (env.world_size / c.batch_size)).backward()
        return logits

    def after_step(self, batch: int, batches: int, lr: float) -> None:
        """The probes due at this step."""
        if self.probes is not None:
            self.probes.after_step(self.model, self.optimizer, self.step, self.epoch + (batch + 1) / batches, lr)

    def save_interrupted(self, sums: torch.Tensor, batch: int) -> None:
        """Write ``last.pt`` mid-epoch after a signal, with the epoch's sums so far and the batch reached."""
        self.elapsed += time.perf_counter() - self.t0
        self.save_resumable(distributed.all_reduce_sum(sums).cpu() + self.carried, batch=batch)

    def resume_hint(self) -> str:
        """The command that continues this run."""
        return f"python -m minima.train --out {self.run_dir} --resume"

    def state(self, batch: int, lr: float) -> TrainState:
        """The loop's state after batch ``batch`` (what callbacks receive)."""
        return TrainState(epoch=self.epoch, batch=batch, step=self.step, lr=lr, model=self.model,
                          optimizer=self.optimizer, env=self.env)

    def save_resumable(self, epoch_sums: torch.Tensor, batch: int) -> None:
        """Write ``last.pt`` (rank 0) at (current epoch, ``batch``) with the epoch's running sums."""
        if self.env.is_main:
            position = {"epoch": self.epoch, "batch": batch, "elapsed_s": self.elapsed}
            ckpt_io.save_checkpoint(self.checkpoint("resume", epoch_sums, position), self.last_path)


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    dataset: data_mod.Dataset | None = None,
    on_step: Callable[[TrainState], None] | None = None,
    on_epoch: Callable[[TrainState], None] | None = None,
) -> Path:
    """Train per ``config``; return the path of ``final.pt`` in the run directory ``config.out``.

    ``dataset`` overrides ``config.data`` (the Python API for notebooks and tests). ``resume`` continues
    from ``last.pt`` if present. Raises :class:`TrainingInterrupted` after SIGTERM/SIGINT (``last.pt``
    written) and :class:`NonFiniteLossError` when the loss is NaN/inf (``last.pt`` kept from before).
    """
    validate_config(config)
    config = with_sam_default(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    with distributed.session(config.device) as env, float32_math(config.float32_math):
        run = _start(config, env, resume, dataset)
        try:
            final = _train(run, on_step, on_epoch)
        except BaseException as error:
            if env.is_main:
                _record_end(run, error)
            _close_sinks(run)
            raise
        _close_sinks(run)
        return final


def _close_sinks(run: Run) -> None:
    """Close the tracking sinks with the run's state (rank 0 holds them)."""
    state = run.files.status().state if run.sinks else ""
    for sink in run.sinks:
        sink.close(state)
    run.sinks = []


def _record_end(run: Run, error: BaseException) -> None:
    """``status.json`` of a run that ended without ``final.pt``: interrupted (a signal, Ctrl-C), diverged (NaN/inf
    loss) or failed (anything else), with its one-line reason."""
    said = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, (TrainingInterrupted, KeyboardInterrupt)):
        state = "interrupted"
    elif isinstance(error, NonFiniteLossError):
        state = "diverged"
    else:
        state, said = "failed", f"{type(error).__name__}: {said}"
    run.files.set_status(state, said, run.epoch, run.step)


def _start(c: TrainConfig, env: distributed.DistEnv, resume: bool, dataset: data_mod.Dataset | None) -> Run:
    """Plan the run: the checks (:func:`_resume_state`), then the construction (:func:`_build`), the position of
    ``last.pt`` when resuming (:func:`_restore`), and rank 0's side effects (:func:`_announce`)."""
    # the run directory is checked before any data is loaded (a refused resume answers at once), except for
    # --batch-size full, whose number (what the run records and a resume compares) is the training set's size
    state = _resume_state(c, env, resume) if c.batch_size != "full" else None
    ds = dataset if dataset is not None else load_dataset(c)
    if c.batch_size == "full":
        c = replace(c, batch_size=len(ds.train))
        state = _resume_state(c, env, resume)
    run = _build(c, env, ds)
    if state is not None:
        _restore(run, state)
    # the probes' private copy is taken before --sync-bn swaps in SyncBatchNorm layers (in place): their BatchNorm in
    # batch mode normalises each probe batch by itself, as on one rank, with no collective inside a probe's forward
    run.probes = _probes(run)
    if env.distributed:
        net: nn.Module = nn.SyncBatchNorm.convert_sync_batchnorm(run.model) if c.sync_bn else run.model
        run.net = nn.parallel.DistributedDataParallel(
            net, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if run.probes is not None and state is not None:
        run.probes.restore(state, run.step)
    if env.is_main:
        _announce(run, resumed=state is not None)
    if run.trainer.get("stopped"):
        run.epoch = c.epochs  # the stopping rule already ended this run before it was interrupted
    return run


def _probes(run: Run) -> ProbeCallback | None:
    """The run's probes on their fixed stratified subset (no augmentation), sharded over the ranks like every
    curvature objective; None without probes."""
    c, ds, env = run.c, run.ds, run.env
    if not c.probe:
        return None
    n = probe_images(c, len(ds.train))
    if c.probe_subset is None and n < DEFAULT_PROBE_SUBSET and env.is_main:
        print(f"[minima.train] probes measure on all {n} training images (fewer than the default "
              f"--probe-subset {DEFAULT_PROBE_SUBSET})", flush=True)
    settings = ProbeSettings(probes=tuple(c.probe), every=c.probe_every, images=n, subset_seed=c.subset_seed,
                             bn_mode=c.probe_bn_mode, topk=c.probe_topk, warm_start=c.probe_warm_start, loss=c.loss,
                             optimizer=base_optimizer(c), momentum=c.momentum, betas=tuple(c.adam_betas),
                             eval_batch_size=c.eval_batch_size, sam_rho=c.sam_rho if c.optimizer == "sam" else None)
    return ProbeCallback(settings, run.model, ds.train, ds.mean, ds.std, env, run.plan.steps_per_epoch, run.run_dir)


def probe_images(c: TrainConfig, n_train: int) -> int:
    """How many training images the probes measure on: ``--probe-subset`` (refused above ``n_train``), or by default
    :data:`DEFAULT_PROBE_SUBSET`, or all ``n_train`` when fewer (a default that does not fit the data is not an
    error)."""
    if c.probe_subset is None:
        return min(DEFAULT_PROBE_SUBSET, n_train)
    if c.probe_subset > n_train:
        raise ValueError(f"--probe-subset {c.probe_subset} exceeds the {n_train} training images; pass at most that, "
                         "or leave it out to use all of them")
    return c.probe_subset


def _resume_state(c: TrainConfig, env: distributed.DistEnv, resume: bool) -> dict[str, Any] | None:
    """Checks only, nothing built or written: the run directory (refusing to resume with other settings, naming each
    difference, or to start over an existing run) and the device's support; ``last.pt`` when resuming."""
    run_dir = Path(c.out)
    last_path, final_path = run_dir / "last.pt", run_dir / "final.pt"
    state: dict[str, Any] | None = None
    if resume and last_path.exists():
        state = ckpt_io.load_checkpoint(last_path)
        # settings added after the run was started count as their defaults (they did not exist then)
        before = {**cfg.to_dict(TrainConfig()), **state["meta"]["train_config"]}
        diffs = cfg.differences(before, cfg.to_dict(c), ignore=RESUMABLE_CHANGES)
        if diffs:
            raise ValueError(f"cannot resume {last_path} with different settings:\n  " + "\n  ".join(diffs)
                             + "\nstart a new run (another --out) to change them")
    elif not resume and (last_path.exists() or final_path.exists()):
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it, or choose "
                              "another --out")
    if c.amp == "bf16" and env.device.type != "cuda":
        raise ValueError("--amp bf16 is supported on CUDA only; use --amp none on CPU")
    return state


def _build(c: TrainConfig, env: distributed.DistEnv, ds: data_mod.Dataset) -> Run:
    """The plan, model, schedule, optimiser and placed data of a run at its start."""
    plan = plan_batches(c.batch_size, env.world_size, c.micro_batch, len(ds.train))
    model, model_kwargs = _initial_model(c, ds.num_classes)
    check_model_accepts(model, ds)
    channels_last = is_convolutional(model) if c.channels_last is None else c.channels_last
    schedule = build_schedule(
        ref_lr=c.lr, ref_batch=c.ref_batch, global_batch=c.batch_size, scaling=c.scaling,
        warmup_epochs=c.warmup_epochs, kind=c.schedule, milestones_epochs=tuple(c.milestones),
        gamma=c.gamma, epochs=c.epochs, steps_per_epoch=plan.steps_per_epoch,
        swa_start_epoch=c.swa_start, swa_lr=c.swa_lr or 0.0, swa_anneal_epochs=c.swa_anneal_epochs,
    )
    model = model.to(env.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = make_optimizer(model, c)
    (train_split, test_split), placement = data_mod.place([ds.train, ds.test], c.data_on_device, env.device)
    return Run(c=c, env=env, ds=ds, plan=plan, schedule=schedule, model=model, net=model, optimizer=optimizer,
               model_kwargs=model_kwargs, channels_last=channels_last, resolved=cfg.to_dict(c),
               train_split=train_split, test_split=test_split, placement=placement)


def _restore(run: Run, state: dict[str, Any]) -> None:
    """Weights, optimiser, position and stopping-rule state of ``last.pt``."""
    run.model.load_state_dict(state["state_dict"])
    run.optimizer.load_state_dict(state["optimizer"])
    pos = state["position"]
    run.epoch, run.batch0, run.elapsed = pos["epoch"], pos["batch"], pos["elapsed_s"]
    run.step = state["meta"]["step"]
    run.trainer = dict(state["trainer"])
    if "swa" in state:
        run.swa = AveragedModel(run.model)
        run.swa.load_state_dict(state["swa"])
    if run.env.is_main:
        run.carried = state["epoch_sums"].to(torch.float64)


def _announce(run: Run, resumed: bool) -> None:
    """Rank 0: the run directory, ``config.json``, the plan printed, ``init.pt`` (a new run) or the metrics of
    epochs after ``last.pt`` dropped (a resumed one)."""
    c, plan = run.c, run.plan
    run.run_dir.mkdir(parents=True, exist_ok=True)
    run.files.write_config(run.resolved)
    run.files.set_status("running", None, run.epoch, run.step)
    run.sinks = open_sinks(c.log, run.run_dir, run.resolved)
    world, acc = run.env.world_size, plan.accumulation
    print(f"[minima.train] {c.model} on {run.env.device} × {world}: global batch {c.batch_size} "
          f"= {world} rank{'s' * (world > 1)} × {acc} micro-batch{'es' * (acc > 1)} × {plan.micro}; "
          f"{plan.steps_per_epoch} steps/epoch ({len(run.ds.train) - plan.steps_per_epoch * c.batch_size} "
          f"samples of each epoch's shuffle dropped); peak LR {run.schedule.peak_lr:g}", flush=True)
    defaults = cfg.to_dict(TrainConfig())
    changed = {k: v for k, v in run.resolved.items() if defaults.get(k) != v and k != "out"}
    print("[minima.train] settings other than the defaults: "
          + (", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(changed.items())) or "none")
          + f"; all of them in {run.run_dir / 'config.json'}", flush=True)
    if not resumed:
        ckpt_io.save_checkpoint(run.checkpoint("final"), run.run_dir / "init.pt")
    else:
        run.files.truncate_metrics(run.epoch)
        print(f"[minima.train] resuming {run.last_path} at epoch {run.epoch + 1}, batch {run.batch0} of "
              f"{plan.steps_per_epoch} (optimiser step {run.step})", flush=True)
    if run.probes is not None:
        run.probes.open(resumed, run.step, run.sinks)


def _train(run: Run, on_step: Callable[[TrainState], None] | None,
           on_epoch: Callable[[TrainState], None] | None) -> Path:
    """Epochs until the cap or the stopping rule; ``final.pt`` at the end."""
    c, env = run.c, run.env
    with stop_on_signals() as stop:
        first = True
        while run.epoch < c.epochs:
            t0 = time.perf_counter()
            sums, seen, lr = _train_epoch(run, stop, t0, on_step)
            stopped = _end_epoch(run, sums, seen, lr, t0)
            left = c.epochs - run.epoch
            if first and env.is_main and left and not stopped:
                took = time.perf_counter() - t0
                tqdm.write(f"[minima.train] estimated {duration(left * took)} for the remaining {left} epoch(s) "
                           f"(≤; the stopping rule may end sooner) at {took:.1f} s per epoch")
            first = False
            if on_epoch is not None:
                on_epoch(replace(run.state(0, lr), metrics=run.last_metrics))
            if stopped:
                break
            if distributed.any_rank(stop["signal"] is not None, env.device) and run.epoch < c.epochs:
                raise TrainingInterrupted(run.last_path, (
                    f"stopped by signal {stop['signal']} at the end of epoch {run.epoch}; {run.last_path} written. "
                    f"Resume with: python -m minima.train --out {run.run_dir} --resume"))
    if run.probes is not None:  # every probe also after the last step
        run.probes.after_last_step(run.model, run.optimizer, run.step, float(run.epoch),
                                   learning_rate(max(run.step - 1, 0), run.schedule))
    final_path = run.run_dir / "final.pt"
    if c.swa_start is not None:
        _write_swa(run)
    if env.is_main:
        ckpt_io.save_checkpoint(run.checkpoint("final"), final_path)
        run.files.set_status("complete", run.trainer.get("stopped") or f"epoch cap {c.epochs}", run.epoch, run.step)
        print(f"[minima.train] wrote {final_path}", flush=True)
    distributed.barrier()
    return final_path


def _feed(run: Run) -> Batching:
    """How the run's evaluations feed a split: ``--eval-batch-size`` images at a time, on the device, float32, in the
    run's memory format."""
    return Batching(run.c.eval_batch_size, run.env.device, torch.float32, run.channels_last)


def _test_metrics(run: Run, model: nn.Module) -> dict[str, Any]:
    """``test_loss``, ``test_accuracy``, ``test_nonfinite`` of ``model`` (the live network, or the SWA average) on the
    run's test split, sharded over the ranks."""
    c, env, ds = run.c, run.env, run.ds
    test = evaluate(model, run.test_split, ds.mean, ds.std, _feed(run), rank=env.rank, world_size=env.world_size,
                    loss=c.loss)
    return {"test_loss": test.loss, "test_accuracy": test.accuracy, "test_nonfinite": test.nonfinite}


def _write_swa(run: Run) -> None:
    """``swa.pt``: the averaged weights with BatchNorm statistics recomputed by ``torch.optim.swa_utils.update_bn``
    over the training images (no augmentation; every rank in lockstep over all of them, so SyncBatchNorm sees the
    same batches), evaluated on the test set like an epoch; a line instead when the stopping rule ended the run
    before any epoch was averaged."""
    c, env = run.c, run.env
    if run.swa is None:
        if env.is_main:
            print(f"[minima.train] no swa.pt: the run stopped after epoch {run.epoch}, before any epoch after "
                  f"--swa-start {c.swa_start} was averaged", flush=True)
        return
    split = run.train_split
    update_bn(_feed(run).batches(split, run.ds.mean, run.ds.std), run.swa, device=env.device)
    metrics: dict[str, Any] = {"epoch": run.epoch, "step": run.step, "swa_start": c.swa_start,
                               "swa_n_averaged": int(run.swa.n_averaged),
                               "swa_bn": f"recomputed on the {len(split)} training images (update_bn)"}
    if c.eval_test:
        metrics.update(_test_metrics(run, run.swa.module))
    if env.is_main:
        path = run.run_dir / "swa.pt"
        ckpt_io.save_checkpoint(run.checkpoint("final", weights=run.swa.module, metrics=metrics), path)
        said = f"; test loss {metrics['test_loss']:.4f} acc {metrics['test_accuracy']:.4f}" if c.eval_test else ""
        print(f"[minima.train] wrote {path}: the average of {metrics['swa_n_averaged']} epochs' weights{said}",
              flush=True)


def _train_epoch(run: Run, stop: dict[str, int | None], t0: float,
                 on_step: Callable[[TrainState], None] | None) -> tuple[torch.Tensor, int, float]:
    """One epoch from ``run.batch0`` on the one training loop (:func:`minima.studies.loop.run_epoch`): this rank's
    micro-batches of the rest of the epoch, fetched one ahead when the data is in pinned host memory. Returns this
    rank's running sums ``[loss, correct, count, nonfinite]`` (float64 on the device), the samples it saw, and the
    last LR."""
    c, plan = run.c, run.plan
    batches, run.fetched = epoch_batches(run.train_split, run.placement, c.seed, run.epoch, c.batch_size, plan,
                                         run.batch0, run.env)
    run.t0 = t0
    run.net.train()
    sums, lr = run_epoch(run, run.batch0, batches, stop, str(run.last_path), on_step,
                         f"epoch {run.epoch + 1}/{c.epochs}", c.progress)
    # every global batch is full (the short one at the end is dropped)
    return sums, (batches - run.batch0) * plan.per_rank, lr


def _end_epoch(run: Run, sums: torch.Tensor, seen: int, lr: float, t0: float) -> str | None:
    """Close the epoch: exact train metrics, test evaluation, stopping rule, ``last.pt`` / ``epoch_XXXX.pt`` /
    ``metrics.jsonl`` on rank 0. Returns the reason to stop, if any."""
    c, env = run.c, run.env
    probe_time = run.probes.take_seconds() if run.probes is not None else 0.0
    train_time = time.perf_counter() - t0 - probe_time  # probes are measured apart from the training's speed
    total = sums_to_result(distributed.all_reduce_sum(sums).cpu() + run.carried)
    run.carried = torch.zeros(4, dtype=torch.float64)
    run.batch0 = 0
    run.epoch += 1
    metrics: dict[str, Any] = {
        "epoch": run.epoch, "step": run.step, "lr": lr, "train_loss": total.loss,
        "train_accuracy": total.accuracy, "train_samples": total.count,
        "images_per_s": seen * env.world_size / train_time if train_time > 0 else float("nan"),
        **({"probe_seconds": probe_time} if run.probes is not None else {}),
    }
    if c.eval_test:
        metrics.update(_test_metrics(run, run.model))
    if c.swa_start is not None and run.epoch > c.swa_start:  # every epoch trained at SWA's LR joins the average
        if run.swa is None:
            run.swa = AveragedModel(run.model)
        run.swa.update_parameters(run.model)
        metrics["swa_n_averaged"] = int(run.swa.n_averaged)
    run.elapsed += time.perf_counter() - t0
    metrics["elapsed_s"] = run.elapsed
    run.last_metrics = metrics
    stopped = _stopping_rule(c, run.trainer, total.loss, total.accuracy)
    if stopped:
        run.trainer["stopped"] = stopped
        metrics["stopped"] = stopped
    if env.is_main:
        run.save_resumable(torch.zeros(4, dtype=torch.float64), batch=0)
        if c.save_every and run.epoch % c.save_every == 0:
            ckpt_io.save_checkpoint(run.checkpoint("final"), run.run_dir / f"epoch_{run.epoch:04d}.pt")
        run.files.append_metrics(metrics)
        for sink in run.sinks:
            sink.log(epoch_values(metrics), run.step)
        msg = (f"epoch {run.epoch}/{c.epochs} step {run.step} lr {lr:.4g} train loss {total.loss:.4f} "
               f"acc {total.accuracy:.4f}")
        if c.eval_test:
            msg += f" | test loss {metrics['test_loss']:.4f} acc {metrics['test_accuracy']:.4f}"
        msg += f" | {metrics['images_per_s']:.0f} img/s"
        if run.epoch % c.print_every == 0 or run.epoch == c.epochs or stopped:
            # the probes that ran since the last printed line, each at its last step, against its threshold
            said = run.probes.take_said() if run.probes is not None else ""
            tqdm.write(msg + (f" | {said}" if said else ""))
        if stopped:
            tqdm.write(f"[minima.train] stopping: {stopped}")
    return stopped


TARGET_MARKS = ("≤ target", "≥ target")  # the words _stopping_rule ends a run at its target with


def reached_target(reason: str | None) -> bool:
    """Whether a run's stopping reason (``status.json``) is ``_stopping_rule`` saying the training target was
    reached (not the epoch cap, the patience rule or an interruption)."""
    return bool(reason) and any(mark in reason for mark in TARGET_MARKS)


def _stopping_rule(c: TrainConfig, trainer: dict[str, Any], loss: float, accuracy: float = 0.0) -> str | None:
    """Keskar trained "until the loss function ceased to improve": a loss target and/or a plateau patience; Cohen et
    al. until a training-accuracy goal. Updates ``trainer`` (best loss, epochs without improvement); returns the
    reason to stop, if any."""
    if c.target_loss is not None and loss <= c.target_loss:
        return f"training loss {loss:.4g} ≤ target {c.target_loss:g}"
    if c.target_accuracy is not None and accuracy >= c.target_accuracy:
        return f"training accuracy {accuracy:.4f} ≥ target {c.target_accuracy:g}"
    if loss < trainer["best_loss"] - c.min_delta:
        trainer["best_loss"], trainer["bad_epochs"] = loss, 0
    else:
        trainer["bad_epochs"] += 1
    if c.patience is not None and trainer["bad_epochs"] >= c.patience:
        return f"training loss has not improved by {c.min_delta:g} for {c.patience} epochs"
    return None
