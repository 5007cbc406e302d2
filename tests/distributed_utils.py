"""Multi-process (gloo) test runs that end deterministically and never block the suite.

:func:`run_gloo_workers` spawns ``world_size`` processes; each joins a gloo group through a
``file://`` store in the test's own tmp folder (no port to race for, no TCPStore server thread),
runs ``worker(rank, *args)`` and then, in a ``finally``, :func:`up2.utils.distributed.teardown_process_group`
(barrier, destroy). The worker's locals (a DDP wrapper, a trainer) are released when it returns,
i.e. before the group is destroyed. The parent waits at most ``timeout_s``: a hang kills every
process and fails the test instead of blocking it.

Workers are module-level functions (spawn pickles them by reference) that write what the test
checks to a file with :func:`save_result` (atomic: a file that exists is complete).
"""
from __future__ import annotations

import os
import time
from datetime import timedelta

import torch

TIMEOUT_S = 240.0  # one run of a 2-process test on a loaded 2-core machine takes ~15 s


def _bootstrap(rank, worker, init_file, world_size, args, timeout_s):
    import torch.distributed as dist

    from up2.utils.distributed import teardown_process_group

    torch.set_num_threads(1)  # 2 processes on 2 cores: no oversubscription
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    ok = False
    try:
        worker(rank, *args)
        ok = True
    finally:
        teardown_process_group(barrier=ok)


def run_gloo_workers(worker, tmp_dir, args=(), world_size: int = 2, timeout_s: float = TIMEOUT_S) -> None:
    """Run ``worker(rank, *args)`` in ``world_size`` spawned processes sharing a gloo group.

    Raises:
        torch.multiprocessing.ProcessRaisedException / ProcessExitedException: a worker failed
            (the others are terminated).
        TimeoutError: the processes did not all finish within ``timeout_s`` (all are killed).
    """
    import torch.multiprocessing as mp

    init_file = os.path.join(str(tmp_dir), f"gloo_init_{os.getpid()}_{time.monotonic_ns()}")
    ctx = mp.start_processes(_bootstrap, args=(worker, init_file, world_size, tuple(args), timeout_s),
                             nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        # a failed worker: join raises (after SIGTERM / SIGKILL of the others, grace_period s each)
        while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic())), grace_period=5):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size} gloo workers did not finish in {timeout_s:.0f} s")
    finally:
        for p in ctx.processes:  # nothing left behind, whatever happened
            if p.is_alive():
                p.kill()
            p.join()


def save_result(obj, path) -> None:
    """``torch.save(obj, path)`` atomically (temp file, fsync, rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
