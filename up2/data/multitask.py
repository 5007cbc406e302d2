"""Task sampling for multi-task training (paper §4.4, Eq. 7).

Shape shorthand: K tasks, named by strings in a fixed order; s_k the normalised sampling
ratio of task k (sum_k s_k = 1). No tensors here: batches are whatever the task loaders
yield (e.g. a list of detectron2 dataset dicts).

* :class:`UnmixedTaskSampler` -- the paper's unmixed strategy: ONE task per iteration, drawn
  with probability s_k from a generator seeded by (seed, iteration) alone, so every rank gets
  the same task without communication and a resumed run repeats the exact sequence.
* :class:`MixedTaskSampler` -- the ablation: every task every iteration, the loss of task k
  multiplied by s_k (the s_k of Eq. 7 taken literally).
* :class:`MultiTaskLoader` -- one lazily started iterator per task plus a sampler.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Iterator, Mapping, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["UnmixedTaskSampler", "MixedTaskSampler", "MultiTaskLoader"]


def _check_nonneg_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


class _TaskRatios:
    """Validated task names and ratios normalised to sum to 1 (shared by both samplers).

    Raises:
        ValueError: empty or duplicate names, a length mismatch, or a ratio that is not a
            finite number > 0.
    """

    def __init__(self, task_names: Sequence[str], sampling_ratios: Sequence[float]):
        names = tuple(task_names)
        ratios = list(sampling_ratios)
        if len(names) == 0:
            raise ValueError("task_names is empty: at least one task is needed")
        if len(names) != len(ratios):
            raise ValueError(f"{len(names)} task_names but {len(ratios)} sampling_ratios; expected one ratio per task")
        if any(not isinstance(n, str) or not n for n in names):
            raise ValueError(f"task_names must be non-empty strings, got {names!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"task_names must be unique, got {names!r}")
        for n, r in zip(names, ratios):
            try:
                ok = math.isfinite(float(r)) and float(r) > 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"sampling ratio of task {n!r} must be a finite number > 0, got {r!r}")
        total = float(sum(float(r) for r in ratios))
        self._names = names
        self._probs = tuple(float(r) / total for r in ratios)

    @property
    def task_names(self) -> Tuple[str, ...]:
        """The K task names, in the order given."""
        return self._names

    @property
    def probabilities(self) -> Dict[str, float]:
        """Task name -> normalised ratio s_k (the values sum to 1), in task order."""
        return dict(zip(self._names, self._probs))

    def _check_names(self, state: Mapping[str, Any]) -> None:
        saved = tuple(state.get("task_names", self._names))
        if saved != self._names:
            raise ValueError(f"sampler state is for tasks {saved!r}, but this sampler has {self._names!r}")


class UnmixedTaskSampler(_TaskRatios):
    """One task per iteration, drawn with probability s_k (paper §4.4, unmixed sampling).

    The draw for iteration ``it`` uses ``numpy.random.default_rng([seed, it])`` only, so it is
    a pure function of (seed, it): identical on every rank with no communication, independent
    of how many draws were made before, and exact after a resume at any iteration.

    Args:
        task_names: K unique task names.
        sampling_ratios: K finite ratios > 0, normalised here to sum to 1.
        seed: non-negative int; use the same on every rank.

    Raises:
        ValueError: see :class:`_TaskRatios`; a negative or non-int seed.
    """

    def __init__(self, task_names: Sequence[str], sampling_ratios: Sequence[float], seed: int = 0):
        super().__init__(task_names, sampling_ratios)
        self.seed = _check_nonneg_int("seed", seed)
        self._cumulative = np.cumsum(np.asarray(self._probs, dtype=np.float64))

    def task_index_for_iteration(self, it: int) -> int:
        """Index in ``task_names`` of the task sampled at iteration ``it`` (>= 0).

        Raises:
            ValueError: ``it`` is not a non-negative int.
        """
        it = _check_nonneg_int("it", it)
        u = np.random.default_rng([self.seed, it]).random()  # uniform in [0, 1)
        index = int(np.searchsorted(self._cumulative, u, side="right"))
        return min(index, len(self._names) - 1)  # guards against cumsum rounding below 1

    def task_for_iteration(self, it: int) -> str:
        """Name of the task sampled at iteration ``it`` (>= 0); see :meth:`task_index_for_iteration`."""
        return self._names[self.task_index_for_iteration(it)]

    def state_dict(self) -> Dict[str, Any]:
        """``{"seed": int, "task_names": list[str]}``; the draw depends only on (seed, it), so
        resuming at iteration N with this state continues the sequence exactly."""
        return {"seed": self.seed, "task_names": list(self._names)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the seed. The ratios stay those given to the constructor (config).

        Raises:
            ValueError: the state names different tasks, or a bad seed.
        """
        self._check_names(state)
        self.seed = _check_nonneg_int("seed", state["seed"])


class MixedTaskSampler(_TaskRatios):
    """Every task every iteration (the mixed strategy of the §4.4 ablation).

    The loss of task k is to be multiplied by its normalised ratio s_k, so the summed loss is
    the weighted sum of Eq. 7 (L = sum_k s_k E[w_k loss_k]); the trainer applies w_k itself.

    Args:
        task_names: K unique task names.
        sampling_ratios: K finite ratios > 0, normalised here to sum to 1 (the loss multipliers).

    Raises:
        ValueError: see :class:`_TaskRatios`.
    """

    def tasks_for_iteration(self, it: int) -> Dict[str, float]:
        """Task name -> loss multiplier s_k, for all K tasks (the same at every iteration).

        Raises:
            ValueError: ``it`` is not a non-negative int.
        """
        _check_nonneg_int("it", it)
        return self.probabilities

    def state_dict(self) -> Dict[str, Any]:
        """``{"task_names": list[str]}`` (the mixed sampler has no random state)."""
        return {"task_names": list(self._names)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check the state names the same tasks.

        Raises:
            ValueError: the state names different tasks.
        """
        self._check_names(state)


class MultiTaskLoader:
    """One data iterator per task, advanced as the sampler says.

    Each task's iterator is started (``iter(loader)``) on its first use only, so loaders of
    tasks never sampled start no workers. Loaders must be infinite (detectron2 train loaders
    are); the data position inside a loader is not part of any resume state (as in
    detectron2), only the task sequence is.

    Args:
        loaders: task name -> iterable of batches, one entry per task of the sampler.
        sampler: an :class:`UnmixedTaskSampler` (use :meth:`next_batch`) or a
            :class:`MixedTaskSampler` (use :meth:`next_batches`).

    Raises:
        ValueError: the loader names differ from the sampler's task names (missing / extra listed).
        TypeError: the sampler is neither kind.
    """

    def __init__(self, loaders: Mapping[str, Iterable], sampler: Union[UnmixedTaskSampler, MixedTaskSampler]):
        if not isinstance(sampler, (UnmixedTaskSampler, MixedTaskSampler)):
            raise TypeError(f"sampler must be an UnmixedTaskSampler or MixedTaskSampler, got {type(sampler).__name__}")
        missing = [n for n in sampler.task_names if n not in loaders]
        extra = [n for n in loaders if n not in sampler.task_names]
        if missing or extra:
            raise ValueError(f"loaders must have one entry per sampler task; missing {missing}, unexpected {extra}")
        self.sampler = sampler
        self._loaders = dict(loaders)
        self._iterators: Dict[str, Iterator] = {}

    def _next(self, name: str) -> Any:
        try:
            if name not in self._iterators:
                # A torch DataLoader draws its base seed from the global torch RNG when its iterator
                # starts (for detectron2's grouped loaders: at the first fetch). Fork the RNG around
                # that first fetch so that starting a task's loader, at its first use or right after
                # a resume, does not shift the random stream the model sees (exact resume). Mappers
                # draw their augmentation randomness from numpy, which is not forked.
                with torch.random.fork_rng(devices=[]):
                    self._iterators[name] = iter(self._loaders[name])
                    return next(self._iterators[name])
            return next(self._iterators[name])
        except StopIteration:
            raise RuntimeError(f"the loader of task {name!r} is exhausted; training loaders must be infinite") from None

    def next_batch(self, it: int) -> Tuple[str, Any]:
        """(task name, next batch of that task) for iteration ``it``; only that task's loader
        advances (unmixed sampling).

        Raises:
            TypeError: the sampler is a MixedTaskSampler (use :meth:`next_batches`).
            RuntimeError: the sampled task's loader is exhausted.
        """
        if not isinstance(self.sampler, UnmixedTaskSampler):
            raise TypeError("next_batch needs an UnmixedTaskSampler; with a MixedTaskSampler use next_batches")
        name = self.sampler.task_for_iteration(it)
        return name, self._next(name)

    def next_batches(self, it: int) -> Dict[str, Any]:
        """Task name -> next batch, for every task (mixed sampling); pair with
        ``sampler.tasks_for_iteration(it)`` for the loss multipliers.

        Raises:
            TypeError: the sampler is an UnmixedTaskSampler (use :meth:`next_batch`).
            RuntimeError: a loader is exhausted.
        """
        if not isinstance(self.sampler, MixedTaskSampler):
            raise TypeError("next_batches needs a MixedTaskSampler; with an UnmixedTaskSampler use next_batch")
        self.sampler.tasks_for_iteration(it)  # validates it
        return {name: self._next(name) for name in self.sampler.task_names}

    def state_dict(self) -> Dict[str, Any]:
        """The sampler's state (see its ``state_dict``)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the sampler's state."""
        self.sampler.load_state_dict(state)
