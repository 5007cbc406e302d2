"""Count the operations that would block the host on a GPU, on any device (CPU included).

On CUDA, the host waits for the device whenever a value computed there is needed on the host
or a result's size depends on the data: ``.item()`` / ``bool(t)`` / ``float(t)``
(``aten._local_scalar_dense``), ``nonzero``, ``unique``, ``masked_select``, indexing or
assigning with a boolean mask, ``repeat_interleave`` without ``output_size``, ``torch.equal``,
copies to the host (``.cpu()``, ``.numpy()``, ``.tolist()``) and tensors built from host data
with a device (``torch.tensor(data, device=...)``, a copy from pageable memory). On the CPU none of
these waits, but they run the same way, so counting them here predicts the GPU step's
synchronisations without a GPU (``torch.cuda.set_sync_debug_mode`` is the check on a GPU).

Usage::

    with count_host_syncs() as report:
        loss = model(batch); loss.backward()
    print(report.total, report.by_site().most_common(5))

Tensors that stay on the host in a GPU run too are not counted: those passed as ``ignore=`` (e.g.
an optimizer's CPU step counters), what ``.cpu()`` returned, what was built from host data without
a device, and what ops computed from such tensors only.

Helpers for code that must not synchronise: :func:`device_assert` (a check of device values:
immediate on the CPU, ``torch._assert_async`` elsewhere), :func:`to_device` (host data to the device
through pinned memory, non-blocking) and :func:`cpu_only` (marks a block that a device check
limits to CPU tensors).
"""
from __future__ import annotations

import contextlib
import os
import threading
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["HostSync", "HostSyncReport", "count_host_syncs", "cpu_only", "device_assert", "to_device"]

_aten = torch.ops.aten
# ops whose result size or value the host needs before it can go on
_SYNC_OPS = {
    _aten._local_scalar_dense.default: "item",
    _aten.nonzero.default: "nonzero",
    _aten.masked_select.default: "masked_select",
    _aten.equal.default: "equal",
    _aten.is_nonzero.default: "is_nonzero",
    _aten.repeat_interleave.Tensor: "repeat_interleave",
    _aten.repeat_interleave.self_Tensor: "repeat_interleave",
    _aten.bincount.default: "bincount",
}
_UNIQUE_OPS = {"_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive"}
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../up2
_NOT_COUNTED = threading.local()  # .depth > 0 inside a cpu_only block (device_assert's CPU check too)


def device_assert(condition: torch.Tensor, message: str, error: type = ValueError) -> None:
    """Check a boolean tensor computed on the device without blocking the host on a GPU.

    On the CPU (where reading the value is free) ``error(message)`` is raised at once unless
    ``condition`` is all True; on other devices ``torch._assert_async`` checks it on the device
    (a failure surfaces at the next synchronisation as a RuntimeError carrying ``message``).
    :func:`count_host_syncs` does not count the CPU check, as on a GPU it is not a sync.

    Args:
        condition: bool tensor (any shape; all elements must be True).
        message: the error message (it cannot quote device values: they are not read).
        error: exception type raised on the CPU.
    """
    if condition.device.type == "cpu":
        with cpu_only():
            ok = bool(condition.all())
        if not ok:
            raise error(message)
    else:
        torch._assert_async(condition.all(), message)


@contextlib.contextmanager
def cpu_only():
    """Mark a block that runs only for CPU tensors (the caller checks the device first), where
    reading values is free: :func:`count_host_syncs` does not count it, as a GPU run never enters it."""
    _NOT_COUNTED.depth = getattr(_NOT_COUNTED, "depth", 0) + 1
    try:
        yield
    finally:
        _NOT_COUNTED.depth -= 1


def to_device(data, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Host data (a list, numpy array or CPU tensor) as a tensor on ``device`` (None: the CPU)
    without blocking the host: on CUDA through pinned memory with a non-blocking copy."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if isinstance(data, torch.Tensor):
        host = data.to(dtype=dtype) if dtype is not None else data
    else:
        host = torch.as_tensor(data, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@dataclass(frozen=True)
class HostSync:
    """One counted operation: its kind (``item``, ``nonzero``, ``bool_index``, ``tolist``, ...) and
    the innermost call site in up2 (``path:line function``; detectron2 / torch frames when the call
    did not come from up2)."""

    kind: str
    site: str


@dataclass
class HostSyncReport:
    """The operations counted inside :func:`count_host_syncs`."""

    events: List[HostSync] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.events)

    def by_site(self) -> Counter:
        """Counter of ``"kind @ site"``."""
        return Counter(f"{e.kind} @ {e.site}" for e in self.events)

    def by_kind(self) -> Counter:
        return Counter(e.kind for e in self.events)

    def summary(self, n: int = 20) -> str:
        """The total and the ``n`` most frequent ``kind @ site`` lines, one per line."""
        lines = [f"{self.total} host syncs"]
        lines += [f"  {count:4d}  {key}" for key, count in self.by_site().most_common(n)]
        return "\n".join(lines)


def _call_site() -> str:
    frames = traceback.extract_stack()[:-3]  # drop this module's own frames
    for frame in reversed(frames):
        if frame.filename.startswith(_ROOT) and not frame.filename.endswith("host_sync.py"):
            return f"{os.path.relpath(frame.filename, os.path.dirname(_ROOT))}:{frame.lineno} {frame.name}"
    for frame in reversed(frames):
        if "host_sync.py" not in frame.filename and "/torch/" not in frame.filename:
            return f"{os.path.basename(frame.filename)}:{frame.lineno} {frame.name}"
    return "?"


def _has_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices if i is not None)


class _SyncMode(TorchDispatchMode):
    def __init__(self, report: HostSyncReport, ignored: "_HostTensors"):
        super().__init__()
        self.report = report
        self.ignored = ignored

    def _ignored(self, args) -> bool:
        tensors = [a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)]
        return bool(tensors) and all(_storage_key(t) in self.ignored for t in tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _SYNC_OPS.get(func)
        if kind == "repeat_interleave" and kwargs.get("output_size") is not None:
            kind = None
        if kind is None and func.__name__.split(".")[0] in _UNIQUE_OPS:
            kind = "unique"
        if kind is None and func in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default,
                                     _aten._index_put_impl_.default) and _has_bool_index(args[1]):
            kind = "bool_index"
        host = self._ignored(args)
        if kind is not None and not getattr(_NOT_COUNTED, "depth", 0) and not host:
            self.report.events.append(HostSync(kind, _call_site()))
        out = func(*args, **kwargs)
        if host:  # computed from host tensors only: the result is on the host too
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.ignored.add(t)
        return out


def _storage_key(t: torch.Tensor):
    try:
        return (t.device.type, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):
        return None


class _HostTensors:
    """Storages of tensors that live on the host in a GPU run; holds the tensors so that their
    memory is not reused (and mistaken for host memory) while counting."""

    def __init__(self, tensors: Iterable[torch.Tensor] = ()):
        self._kept = {}
        for t in tensors:
            self.add(t)

    def add(self, t: torch.Tensor) -> None:
        self._kept[_storage_key(t)] = t

    def __contains__(self, key) -> bool:
        return key in self._kept


@contextlib.contextmanager
def count_host_syncs(ignore: Optional[Iterable[torch.Tensor]] = None) -> Iterator[HostSyncReport]:
    """Count host-blocking operations run inside the block (module docstring).

    Counted: the dispatcher ops listed in the module docstring (boolean-mask ``index`` and
    ``index_put``), and calls of ``Tensor.tolist`` / ``.cpu`` / ``.numpy`` and of
    ``torch.tensor`` / ``torch.as_tensor`` with an explicit ``device`` (``as_tensor`` of a tensor
    already there is free and not counted). Not counted: copies made with ``.to(device)``, and reads
    of host tensors: what ``.cpu()`` returned (a copy, as on a GPU), what ``torch.tensor`` /
    ``torch.as_tensor`` built from Python data without a device, ``torch.from_numpy`` arrays,
    and what ops computed from host tensors only.

    Args:
        ignore: tensors that stay on the host in a GPU run as well (their storage is compared), e.g.
            an optimizer's step counters; an op is left out when every tensor argument is ignored.

    Yields:
        a :class:`HostSyncReport`, filled as the block runs.
    """
    report = HostSyncReport()
    ignored = _HostTensors(ignore or ())
    patched = []

    def record(kind: str) -> None:
        report.events.append(HostSync(kind, _call_site()))

    def wrap_method(name: str):
        original = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            if _storage_key(self) not in ignored:
                record(name)
            out = original(self, *args, **kwargs)
            if name == "cpu":
                # a host copy, as on a GPU (where .cpu() never aliases): later reads of it are free
                if _storage_key(out) == _storage_key(self):
                    out = out.clone()
                ignored.add(out)
            return out

        patched.append((torch.Tensor, name, original))
        setattr(torch.Tensor, name, method)

    def wrap_factory(name: str):
        original = getattr(torch, name)

        def factory(data, *args, **kwargs):
            device = kwargs.get("device")
            if device is not None and not (isinstance(data, torch.Tensor) and name == "as_tensor"
                                           and data.device == torch.device(device)):
                record(f"{name}(device=)")
            out = original(data, *args, **kwargs)
            if device is None and not isinstance(data, torch.Tensor):
                ignored.add(out)  # built from host data, on the host
            return out

        patched.append((torch, name, original))
        setattr(torch, name, factory)

    for name in ("tolist", "cpu", "numpy"):
        wrap_method(name)
    for name in ("tensor", "as_tensor"):
        wrap_factory(name)
    original_from_numpy = torch.from_numpy

    def from_numpy(array):
        out = original_from_numpy(array)
        ignored.add(out)  # numpy data: on the host
        return out

    patched.append((torch, "from_numpy", original_from_numpy))
    torch.from_numpy = from_numpy
    try:
        with _SyncMode(report, ignored):
            yield report
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
