"""Deterministic teardown of a multi-process (torch.distributed) run.

detectron2's ``launch`` calls ``main_func(*args)`` in every spawned worker and returns: the
process group (and the subgroups ``detectron2.utils.comm`` caches) is never destroyed, and
whatever the worker built (a DDP wrapper, a trainer) may still be alive when the interpreter
shuts down. Ranks then leave at different times and the C++ objects (gloo contexts, the
TCPStore server rank 0 hosts, the DDP reducer) are destroyed during interpreter finalisation,
which now and then aborts the process after ``main_func`` returned ("terminate called without
an active exception", SIGABRT). :func:`teardown_process_group` ends a run in a fixed order
instead: release the worker's objects, wait for every rank (barrier), destroy the groups.
:func:`launch` is detectron2's ``launch`` with that teardown in a ``finally`` of every worker.
"""
from __future__ import annotations

import functools
import gc
import sys
from datetime import timedelta

__all__ = ["launch", "teardown_process_group", "gather_with_grad"]


def teardown_process_group(barrier: bool = True) -> None:
    """Release garbage, wait for all ranks (if ``barrier``) and destroy every process group.

    A no-op without an initialised default group. Call it on every rank, after the objects that
    hold the group (DDP wrapper, trainer) were released; pass ``barrier=False`` on an error path
    (the other ranks may never reach the barrier: the caller is failing anyway, and the parent's
    process supervision stops them).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()  # a DDP wrapper or trainer in a reference cycle: its reducer goes before its group
    try:
        if barrier:
            dist.barrier()  # every rank is done with the group before any rank destroys it
    finally:
        comm = sys.modules.get("detectron2.utils.comm")
        if comm is not None:  # detectron2 keeps its local and gloo groups alive: drop those references
            comm._LOCAL_PROCESS_GROUP = None
            for cached in ("_get_global_gloo_group", "create_local_process_group"):
                clear = getattr(getattr(comm, cached, None), "cache_clear", None)
                if clear is not None:
                    clear()
        dist.destroy_process_group()  # the default group and every subgroup
        gc.collect()


def _run_then_teardown(main_func, *args):
    """``main_func(*args)`` in a spawned worker, then :func:`teardown_process_group` (in ``finally``)."""
    ok = False
    try:
        result = main_func(*args)
        ok = True
        del result  # the worker's return value is discarded by launch: release it before the teardown
    finally:
        teardown_process_group(barrier=ok)


def launch(main_func, num_gpus_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url=None, args=(), timeout: timedelta = None):
    """detectron2's ``launch`` whose workers tear down their process group when ``main_func`` returns.

    Same arguments as :func:`detectron2.engine.launch`. With one process ``main_func(*args)`` runs
    here and its return value is returned (no group is created); with several, every worker runs
    ``main_func(*args)`` and then :func:`teardown_process_group` in a ``finally`` (barrier only if
    ``main_func`` returned normally), and nothing is returned.
    """
    from detectron2.engine import launch as d2_launch
    from detectron2.engine.launch import DEFAULT_TIMEOUT

    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    if num_machines * num_gpus_per_machine <= 1:
        return main_func(*args)
    d2_launch(functools.partial(_run_then_teardown, main_func), num_gpus_per_machine, num_machines=num_machines,
              machine_rank=machine_rank, dist_url=dist_url, args=args, timeout=timeout)
    return None


def gather_with_grad(x):
    """(N, ...) on each of G ranks -> (G*N, ...), rank-major, differentiable; ``x`` itself
    without a process group or with one rank.

    The backward pass sums each rank's slice of the gradient over all ranks
    (``torch.distributed.nn.functional.all_gather``), so with DDP's averaging the parameters get
    the gradient of the mean loss over ranks. Every rank must call it with the same shape.
    """
    import warnings

    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; still the public autograd gather
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x), dim=0)
