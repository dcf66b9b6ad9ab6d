"""Multi-process training (PyTorch DDP): process group, rank helpers, batch slicing, global loss, synced norms.

    torchrun --nproc_per_node 4 -m vericar.train --run-dir runs/ddp --epochs 30 ...     # one machine
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m vericar.train ...

The same entry point as a single-process run: :func:`vericar.train.main` calls :func:`init_from_env`, which
starts the process group when torchrun's variables say there is more than one process (``nccl`` on CUDA,
``gloo`` on the CPU), and :func:`vericar.train.train` asks :func:`context` whether it runs distributed.

What a distributed run does, and why it reproduces the single-process run with the same *global* batch:

* **Batches.** ``TrainConfig.batch_size`` is the global batch. Every rank draws the same class-balanced
  batch list of an epoch (``MPerClassSampler`` seeded from ``seed`` and the epoch) and takes its contiguous
  slice of each batch (:func:`rank_slice`); with ``batch_size % (world_size * m_per_class) == 0`` each
  slice holds whole classes. Augmentation (and the flip draw of the cached modes) is drawn for the global
  batch from the same generator on every rank and then sliced, so each image is augmented exactly as in
  the single-process run (augmenting the global batch is cheap next to the forward/backward of a slice).
* **Loss over the global batch.** Multi-Similarity mining and the loss need every pair of the global
  batch, so embeddings and labels are all-gathered before the loss (:func:`wrap_loss`: pytorch-metric-
  learning's ``DistributedMinerWrapper`` + ``DistributedLossWrapper`` for the MS losses, the same gather
  for the others). Every rank then computes the same global loss, with gradients flowing only into its own
  embeddings; the loss is multiplied by the world size so that DDP's gradient *average* becomes the
  gradient of the global loss. (The reported loss is divided back.)
* **Batch norm.** Per-rank batch statistics are not the global batch's; under DDP every BatchNorm is
  converted to a synchronised one (:func:`convert_sync_batchnorm`): ``torch.nn.SyncBatchNorm`` on CUDA,
  and :class:`CPUSyncBatchNorm` on the CPU, where torch's refuses to run (it only supports GPU inputs).
  Running statistics then match too.
* **Not reproduced:** dropout masks (drawn per rank on the slice; the same in distribution, not in value).
  With ``dropout=0`` a 2-process CPU run matches the 1-process run up to float rounding (tests/test_distributed.py).
* **Rank 0** writes the run folder (config, checkpoints, history, embeddings, metrics), evaluates and shows
  progress; the others wait at a barrier at the end and then load the finished run folder. A resumed run
  must use the same world size (it is recorded in ``config.json`` when > 1). Every rank reads the run folder
  (to resume, and at the end), so across several machines it must be on a shared filesystem.
* **Backend.** ``nccl`` when CUDA is available, else ``gloo``; ``python -m vericar.train --device cpu``
  always uses ``gloo``, and ``VERICAR_DIST_BACKEND`` overrides the choice.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CPUSyncBatchNorm",
    "DistContext",
    "DistributedLoss",
    "TrainForward",
    "barrier",
    "check_batch_size",
    "cleanup",
    "context",
    "convert_sync_batchnorm",
    "default_backend",
    "device_for",
    "init_from_env",
    "is_distributed",
    "is_main",
    "main_first",
    "rank",
    "rank_slice",
    "world_size",
    "wrap_loss",
    "wrap_model",
]

#: Collective timeout: rank 0 evaluates alone while the others wait in the next step's collectives.
DEFAULT_TIMEOUT_MINUTES = 60

_SYNC_BATCHNORM = True  # set by init_from_env(sync_batchnorm=...)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``world_size`` processes, this one is ``rank`` (``local_rank`` on its node)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    backend: str | None = None
    sync_batchnorm: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# ----------------------------------------------------------------------------------------------------
# Process group
# ----------------------------------------------------------------------------------------------------

def default_backend() -> str:
    """``nccl`` when CUDA is available, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def init_from_env(backend: str | None = None, *, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES,
                  sync_batchnorm: bool = True, init_method: str | None = None) -> DistContext:
    """Start the process group from torchrun's variables (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``); a no-op (world size 1) when they are absent or say one process.

    ``backend`` defaults to :func:`default_backend`, but a ``cpu`` device needs ``gloo``: set
    ``VERICAR_DIST_BACKEND=gloo`` or pass it. ``sync_batchnorm=False`` keeps per-rank batch statistics
    (faster on many GPUs, not equal to the single-process run). Returns :func:`context`.
    """
    global _SYNC_BATCHNORM
    _SYNC_BATCHNORM = bool(sync_batchnorm)
    world = _env_int("WORLD_SIZE", 1)
    if world > 1 and not dist.is_initialized():
        if not dist.is_available():  # pragma: no cover
            raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)] if init_method is None else []
        if missing:
            raise RuntimeError(f"WORLD_SIZE={world} but {missing} are not set: launch with "
                               "`torchrun --nproc_per_node N -m vericar.train ...`")
        backend = backend or os.environ.get("VERICAR_DIST_BACKEND") or default_backend()
        if backend == "nccl":
            torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
        dist.init_process_group(backend, init_method=init_method, world_size=world,
                                rank=_env_int("RANK", 0), timeout=_dt.timedelta(minutes=timeout_minutes))
    return context()


def context() -> DistContext:
    """The current :class:`DistContext` (world size 1, rank 0 when no process group is running)."""
    if not is_distributed():
        return DistContext(sync_batchnorm=_SYNC_BATCHNORM)
    return DistContext(world_size=dist.get_world_size(), rank=dist.get_rank(),
                       local_rank=_env_int("LOCAL_RANK", dist.get_rank()),
                       backend=dist.get_backend(), sync_batchnorm=_SYNC_BATCHNORM)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. to write a cache), then the others (which then read it)."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def cleanup() -> None:
    """Destroy the process group (if this process started one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(device: torch.device) -> torch.device:
    """Under DDP a CUDA device means this rank's GPU (``cuda:LOCAL_RANK``); anything else is kept."""
    device = torch.device(device)
    if device.type == "cuda" and is_distributed() and device.index is None:
        device = torch.device("cuda", context().local_rank)
        torch.cuda.set_device(device)
    if is_distributed() and dist.get_backend() == "nccl" and device.type != "cuda":
        raise ValueError(f"the nccl backend needs CUDA devices, got {device}: use VERICAR_DIST_BACKEND=gloo")
    return device


# ----------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------

def check_batch_size(batch_size: int, m_per_class: int | None = None, world: int | None = None) -> None:
    """The global batch must split into equal per-rank slices (of whole classes, with ``m_per_class``)."""
    world = world_size() if world is None else world
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} (the global batch) must be a multiple of the world size {world}")
    if m_per_class and (batch_size // world) % m_per_class:
        import warnings

        warnings.warn(f"per-rank slices of {batch_size // world} images split classes of m_per_class="
                      f"{m_per_class}; harmless (the loss sees the gathered global batch)", stacklevel=2)


def rank_slice(batch_len: int, rank_: int | None = None, world: int | None = None) -> slice:
    """This rank's contiguous share of a global batch of ``batch_len`` items (equal shares; see
    :func:`check_batch_size`). ``slice(None)`` (everything) in a single process.

    Every rank builds the same batch list (same seed and epoch) and takes its slice: together the ranks
    process exactly the single-process run's batches.
    """
    world = world_size() if world is None else world
    rank_ = rank() if rank_ is None else rank_
    if world == 1:
        return slice(None)
    if batch_len % world:
        raise ValueError(f"a batch of {batch_len} does not split evenly over {world} ranks")
    share = batch_len // world
    return slice(rank_ * share, (rank_ + 1) * share)


# ----------------------------------------------------------------------------------------------------
# Loss over the global batch
# ----------------------------------------------------------------------------------------------------

class DistributedLoss(nn.Module):
    """A :func:`vericar.losses.make_loss` loss computed over the batch gathered from every rank.

    ``forward(embeddings, labels, level_labels=None)`` like the wrapped loss. In a single process it is the
    wrapped loss. Under DDP it returns ``world_size x`` the loss of the global batch (the pml convention:
    DDP averages gradients, each rank contributes the gradient through its own embeddings); divide by
    :attr:`scale` to report it. :class:`vericar.losses.MSLoss` runs through pml's
    ``DistributedMinerWrapper`` and ``DistributedLossWrapper``; every other loss gets the same
    gather (own rows first, then the other ranks in rank order) of embeddings, labels and level labels.
    """

    def __init__(self, loss: nn.Module):
        super().__init__()
        from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, DistributedMinerWrapper

        from .losses import MSLoss

        self.loss = loss
        self.needs_level_labels = getattr(loss, "needs_level_labels", False)
        self.pml_loss = self.pml_miner = None
        if isinstance(loss, MSLoss):
            self.pml_loss = DistributedLossWrapper(loss.loss_fn)
            self.pml_miner = DistributedMinerWrapper(loss.miner) if loss.miner is not None else None

    @property
    def scale(self) -> int:
        return world_size()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None,
                level_labels: torch.Tensor | None = None) -> torch.Tensor:
        world = world_size()
        if world == 1:
            return self.loss(embeddings, labels, level_labels=level_labels)
        from pytorch_metric_learning.utils import distributed as pml_dist

        if labels is not None:
            labels = torch.as_tensor(labels, device=embeddings.device)
        if self.pml_loss is not None:
            if labels is None:
                raise ValueError("MSLoss needs labels (N,)")
            indices = self.pml_miner(embeddings, labels) if self.pml_miner is not None else None
            return self.pml_loss(embeddings, labels, indices)  # already x world_size
        all_emb, all_labels, _ = pml_dist.gather(embeddings, labels)
        all_levels = None
        if level_labels is not None:
            level_labels = level_labels.to(embeddings.device)
            all_levels = torch.cat([level_labels, pml_dist.all_gather(level_labels)])
        return self.loss(all_emb, all_labels, level_labels=all_levels) * world


def wrap_loss(loss: nn.Module) -> nn.Module:
    """``loss`` itself in a single process, else a :class:`DistributedLoss` around it."""
    return DistributedLoss(loss) if is_distributed() else loss


# ----------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------

class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the backward sums the gradients of every rank's output."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are those of the batch gathered over all ranks, on any
    device and backend (``torch.nn.SyncBatchNorm`` only runs on GPUs). Same parameters, buffers and
    ``state_dict`` keys as ``BatchNorm1d/2d/3d``; eval mode, or a single process, is plain batch norm.

    Two differentiable all-reduces per call (sums, then centred squares: the two-pass variance, as
    precise as the single-process one); their backward all-reduces the gradients, so the statistics'
    gradients reach every rank's inputs.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and is_distributed()):
            return super().forward(input)
        all_reduce = _AllReduceSum.apply
        c = input.shape[1]
        dims = [0, *range(2, input.dim())]
        shape = [1, c] + [1] * (input.dim() - 2)
        count = float(input.numel() // c) * world_size()
        mean = all_reduce(input.sum(dims)) / count
        centred = input - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var * (count / max(count - 1.0, 1.0))
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.detach().to(self.running_var.dtype), alpha=factor)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def _convert_cpu_sync(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        out = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu_sync(child))
    return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Every BatchNorm of ``module`` made synchronised across ranks (``torch.nn.SyncBatchNorm`` on CUDA,
    :class:`CPUSyncBatchNorm` elsewhere). Parameters and buffers are kept (the same tensors), so
    ``state_dict`` keys and values do not change and a checkpoint loads into the plain model. Convert
    before taking references to submodules (e.g. :func:`vericar.models.split_backbone`)."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu_sync(module)


class TrainForward(nn.Module):
    """What a training step runs: ``model(x)`` on images, or ``normalize(model.head(tail(x)))`` on cached
    trunk outputs (``tail`` given). One module, so DDP can wrap it in every mode."""

    def __init__(self, model: nn.Module, tail: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.tail = tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tail is None:
            return self.model(x)
        return F.normalize(self.model.head(self.tail(x)), dim=-1)


def wrap_model(module: nn.Module, device: torch.device | str) -> nn.Module:
    """``module`` in a single process; under DDP a ``DistributedDataParallel`` around it (parameters
    broadcast from rank 0; buffers are not re-broadcast each step: with synchronised batch norm they agree,
    and frozen trunks' buffers do not change)."""
    if not is_distributed():
        return module
    device = torch.device(device)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    sync = not context().sync_batchnorm
    import inspect

    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters:
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=sync)
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=sync)  # torch < 2.12
