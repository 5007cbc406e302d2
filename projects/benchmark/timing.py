"""Timing of callables for the speed benchmark: warm-up, round-robin repeats, medians, and the
median of per-round ratios (two calls timed in the same round see the same machine load)."""
from __future__ import annotations

import statistics
import time

import torch


def sync(device: str) -> None:
    """Waits for queued CUDA work (CPU calls are synchronous)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fns, device: str, warmups, repeats: int) -> list:
    """Times callables round-robin: each one's ``warmups[i]`` untimed calls, then ``repeats``
    rounds in which every callable runs once.

    Returns:
        per callable {"first_s": its first call, "times_s": the timed calls, "median_s"} (seconds).
    """
    first, times = [None] * len(fns), [[] for _ in fns]

    def call(i):
        sync(device)
        t0 = time.perf_counter()
        fns[i]()
        sync(device)
        dt = time.perf_counter() - t0
        first[i] = dt if first[i] is None else first[i]
        return dt

    for i, n in enumerate(warmups):
        for _ in range(n):
            call(i)
    for _ in range(repeats):
        for i in range(len(fns)):
            times[i].append(call(i))
    return [{"first_s": first[i], "times_s": times[i], "median_s": statistics.median(times[i])}
            for i in range(len(fns))]


def paired_ratios(reference, others: dict, device: str, rounds: int) -> dict:
    """{name: median over ``rounds`` rounds of (reference s / other s)}: every callable runs
    once per round, after one warm-up call each."""
    fns = [reference, *others.values()]
    res = measure(fns, device, [1] * len(fns), rounds)
    return {k: statistics.median(a / b for a, b in zip(res[0]["times_s"], r["times_s"]))
            for k, r in zip(others, res[1:])}
