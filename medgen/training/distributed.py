"""Data-parallel training across processes launched by `torchrun` (gloo on CPU, NCCL on CUDA).

    torchrun --nproc_per_node 2 -m medgen train gan --data DIR --out runs/gan

Every rank holds a full replica. Each iteration all ranks draw the same global batch indices (same
seed) and take their contiguous share, so the global batch equals `train.batch_size`. After every
backward pass, and before its optimizer steps, the gradients of that optimizer's parameters are
averaged over ranks (one flattened all-reduce per optimizer step): the update equals the
single-process update on the global batch for mean-reduced losses.

Why not wrap the model in `torch.nn.parallel.DistributedDataParallel`: its reducer syncs gradients
only for forwards that go through the wrapper, once per forward, while the GAN Steps call the
sub-networks directly, run several backward passes per iteration (critic, generator, code critic)
and differentiate the critic's gradient for the WGAN-GP penalty (double backward), which DDP does
not support. Averaging at `StepContext.backward_step` gives DDP's semantics for every Step.

Noise: `StepContext.randn` draws the global batch's noise on every rank and returns this rank's rows,
so Steps that draw all per-sample noise through it (the gan and alpha-gan Steps do, gradient-penalty
weights included) see exactly the single-process noise. Batch norm uses per-rank statistics on CPU
(use instance/layer norm for exact parity); on CUDA the model's BatchNorm layers become SyncBatchNorm.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from medgen.errors import MedgenError


@dataclass
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another env:// launcher) started this process as part of a job of 2+ ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    Args:
        device: the device asked for; on CUDA each rank uses cuda:LOCAL_RANK.

    Returns:
        (DistInfo, the device this rank trains on). Outside torchrun: DistInfo() and `device` unchanged.
    """
    if dist.is_available() and dist.is_initialized():
        return info(), device
    if not launched_by_torchrun():
        return DistInfo(), device
    if not dist.is_available():
        raise MedgenError("this PyTorch build has no torch.distributed; run without torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise MedgenError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices; "
                              "lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://")
    return info(), device


def info() -> DistInfo:
    """The current process group's rank and size (DistInfo() when not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")), backend=dist.get_backend())


def cleanup() -> None:
    """Leave the process group (no-op when none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_batch_size(global_batch: int, world_size: int) -> int:
    """Per-rank batch; the global batch must split evenly so that the update equals a single-process one."""
    if global_batch % world_size:
        raise MedgenError(f"train.batch_size {global_batch} does not split over {world_size} processes; "
                          f"use a multiple of {world_size}")
    return global_batch // world_size


def shard(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch's indices [B] -> [B / world_size]."""
    n = local_batch_size(indices.numel(), world_size)
    return indices[rank * n:(rank + 1) * n]


def broadcast_model(model: nn.Module, src: int = 0) -> None:
    """Copy parameters and buffers of rank `src` to every rank (identical replicas at the start)."""
    if not info().enabled:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """On CUDA, replace BatchNorm layers by SyncBatchNorm (global-batch statistics); CPU keeps per-rank BN."""
    if info().enabled and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def average_gradients(opt: torch.optim.Optimizer) -> None:
    """All-reduce (mean) the gradients of `opt`'s parameters in one flattened buffer.

    Every rank runs the same Step code, so the same parameters have gradients on every rank.
    """
    world = info().world_size
    if world < 2:
        return
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # [sum of numels]
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view(g.shape))
        offset += n


def reduce_losses(losses: dict[str, float]) -> dict[str, float]:
    """Mean of each logged loss over ranks (the global-batch value for mean-reduced losses)."""
    if not info().enabled or not losses:
        return losses
    keys = sorted(losses)
    t = torch.tensor([float(losses[k]) for k in keys], dtype=torch.float64)
    if info().backend == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= info().world_size
    return {k: float(v) for k, v in zip(keys, t.tolist(), strict=True)}


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if info().enabled:
        dist.barrier()
