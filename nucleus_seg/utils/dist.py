"""Starting and leaving distributed workers: detectron2's ``launch()``, plus several ranks per GPU."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT, _find_free_port
from detectron2.utils import comm

__all__ = ["launch", "close_process_group", "device_for_local_rank"]

logger = logging.getLogger(__name__)


def device_for_local_rank(local_rank: int, procs_per_gpu: int) -> int:
    """The GPU a rank runs on when ``procs_per_gpu`` consecutive ranks share each GPU."""
    return local_rank // max(1, procs_per_gpu)


def launch(main_func: Callable[..., Any], num_gpus_per_machine: int, *, procs_per_gpu: int = 1,
           num_machines: int = 1, machine_rank: int = 0, dist_url: str | None = None,
           args: tuple = (), timeout: timedelta | None = None) -> None:
    """detectron2's ``launch``, or, with ``procs_per_gpu > 1``, that many training processes per GPU.

    Why several per GPU: Mask R-CNN training is host-bound (Python in the RPN and ROI heads, one step of
    GPU work is a fraction of a step's wall time), so a second process on the same GPU fills the idle
    time. NCCL refuses two ranks on one device, so these ranks use gloo (gradients cross host memory).
    """
    timeout = timeout or DEFAULT_TIMEOUT
    if procs_per_gpu <= 1:
        if num_gpus_per_machine * num_machines > 1:  # spawned ranks leave as _shared_gpu_worker's do
            main_func, args = _leave_after, (main_func, args)
        d2_launch(main_func, num_gpus_per_machine, num_machines=num_machines, machine_rank=machine_rank,
                  dist_url=dist_url, args=args, timeout=timeout)
        return
    if torch.cuda.is_available() and num_gpus_per_machine > torch.cuda.device_count():
        raise ValueError(f"{num_gpus_per_machine} GPUs asked for, {torch.cuda.device_count()} visible")
    local_world = num_gpus_per_machine * procs_per_gpu
    if dist_url == "auto" or dist_url is None:
        if num_machines != 1:
            raise ValueError("--dist-url auto works on one machine only; give tcp://HOST:PORT of machine 0")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.start_processes(_shared_gpu_worker, nprocs=local_world, daemon=False,
                       args=(main_func, num_machines * local_world, local_world, procs_per_gpu, machine_rank,
                             dist_url, args, timeout))


def _shared_gpu_worker(local_rank: int, main_func: Callable[..., Any], world_size: int, local_world: int,
                       procs_per_gpu: int, machine_rank: int, dist_url: str, args: tuple,
                       timeout: timedelta) -> None:
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size,
                            rank=machine_rank * local_world + local_rank, timeout=timeout)
    comm.create_local_process_group(local_world)
    if torch.cuda.is_available():
        torch.cuda.set_device(device_for_local_rank(local_rank, procs_per_gpu))
    comm.synchronize()
    _leave_after(main_func, args)


def _leave_after(main_func: Callable[..., Any], args: tuple) -> None:
    """Run a spawned rank's work, then leave without interpreter teardown: there a rank once died (oneMKL
    "Cannot load libtorch_cpu.so") and turned a finished training into a failed one, and gloo threads still
    alive abort a process ("terminate called without an active exception", seen in a 2-rank CPU test).
    An exception still propagates (launch() reports it)."""
    main_func(*args)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def close_process_group() -> None:
    """Wait for every rank, then tear the process groups down.

    gloo threads still alive at interpreter exit can abort a worker ("terminate called without an active
    exception"), which launch() then reports as a crashed run although all work was done.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
