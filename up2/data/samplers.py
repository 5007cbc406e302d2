"""An index sampler that can resume mid-stream, for exact training resume."""
from __future__ import annotations

import itertools

from detectron2.data.samplers import TrainingSampler

__all__ = ["ResumableTrainingSampler"]


class ResumableTrainingSampler(TrainingSampler):
    """detectron2's TrainingSampler (infinite, shuffled with a fixed seed, sharded by rank)
    whose stream can start after the first ``skip`` indices of this rank.

    Set ``skip`` before the loader's iterator is created (the trainer does it when it resumes:
    skip = batches this task already trained on x images per rank). Only the index stream is
    advanced; no image is read.
    """

    def __init__(self, size: int, shuffle: bool = True, seed=None):
        super().__init__(size, shuffle=shuffle, seed=seed)
        self.skip = 0

    def __iter__(self):
        yield from itertools.islice(super().__iter__(), self.skip, None)
