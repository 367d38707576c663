"""The processes of a distributed launch (`torchrun`, `accelerate launch`): who this rank is, the
process group with a timeout on its collectives, and the FSDP2 load of a model.

Every rank runs the same `efx run`: it trains, prunes and evaluates in lockstep; rank 0 alone
writes files (the expert, the stage records, the report).
"""
from __future__ import annotations

import datetime
import logging
import os

import torch

log = logging.getLogger(__name__)

TIMEOUT_S = 1800  # a collective that waits longer fails the job (a rank that died, a rank that diverged)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Whether this process is one of several of a distributed launch."""
    return world_size() > 1


def init(device: torch.device, timeout_s: int = TIMEOUT_S) -> None:
    """The default process group (gloo on a CPU, NCCL on CUDA), once, with `timeout_s` on every
    collective."""
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        log.info("rank %d of %d (%s)", rank(), world_size(), backend)


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def peak_rss_mb_per_rank() -> list[float]:
    """Each rank's peak resident memory so far (MB), gathered on every rank."""
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [peak]
    peaks = [None] * world_size()
    torch.distributed.all_gather_object(peaks, peak)
    return peaks


def fsdp_config():
    """transformers' load-time sharding over every rank: FSDP2 on the model's own plan (each
    decoder layer a unit), so that no rank ever holds the whole model."""
    from transformers.distributed import DistributedConfig
    return DistributedConfig(fsdp_size=world_size())
