"""Leaving a detectron2 ``launch()`` worker cleanly."""

from __future__ import annotations


def close_process_group() -> None:
    """Wait for every rank, then tear the process groups down.

    gloo threads still alive at interpreter exit can abort a worker ("terminate called without an active
    exception"), which launch() then reports as a crashed run although all work was done.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
