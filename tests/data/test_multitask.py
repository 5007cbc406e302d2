"""Task samplers and the multi-task loader (paper §4.4 unmixed / mixed sampling)."""
import itertools
from collections import Counter

import pytest

from up2.data.multitask import MixedTaskSampler, MultiTaskLoader, UnmixedTaskSampler

NAMES = ("detection", "captioning", "retrieval", "mlm")
RATIOS = (0.5, 0.3, 0.15, 0.05)


def test_frequencies_match_ratios():
    sampler = UnmixedTaskSampler(NAMES, [10, 6, 3, 1], seed=7)  # normalised to RATIOS
    assert sampler.probabilities == pytest.approx(dict(zip(NAMES, RATIOS)))
    n = 10_000
    counts = Counter(sampler.task_for_iteration(it) for it in range(n))
    for name, ratio in zip(NAMES, RATIOS):
        assert abs(counts[name] / n - ratio) < 0.02, (name, counts[name] / n, ratio)


def test_same_seed_same_sequence_on_every_rank_and_different_seed_differs():
    rank0 = UnmixedTaskSampler(NAMES, RATIOS, seed=3)
    rank1 = UnmixedTaskSampler(NAMES, RATIOS, seed=3)
    seq0 = [rank0.task_for_iteration(it) for it in range(500)]
    seq1 = [rank1.task_for_iteration(it) for it in range(500)]
    assert seq0 == seq1
    # order of queries does not matter: a pure function of (seed, it)
    assert [rank1.task_for_iteration(it) for it in reversed(range(500))] == seq0[::-1]
    other = UnmixedTaskSampler(NAMES, RATIOS, seed=4)
    assert [other.task_for_iteration(it) for it in range(500)] != seq0


def test_resume_continues_exactly():
    first = UnmixedTaskSampler(NAMES, RATIOS, seed=11)
    full = [first.task_for_iteration(it) for it in range(300)]
    state = first.state_dict()
    resumed = UnmixedTaskSampler(NAMES, RATIOS)  # default seed 0, overwritten by the state
    resumed.load_state_dict(state)
    assert [resumed.task_for_iteration(it) for it in range(150, 300)] == full[150:]
    with pytest.raises(ValueError, match="tasks"):
        UnmixedTaskSampler(("a", "b"), (1, 1)).load_state_dict(state)


def test_single_task_always_sampled():
    sampler = UnmixedTaskSampler(["only"], [3.0])
    assert {sampler.task_for_iteration(it) for it in range(50)} == {"only"}


def _counting_loader(name, log):
    for i in itertools.count():
        log[name] += 1
        yield (name, i)


def test_unmixed_loader_advances_only_sampled_task():
    log = Counter()
    sampler = UnmixedTaskSampler(NAMES, RATIOS, seed=5)
    loader = MultiTaskLoader({n: _counting_loader(n, log) for n in NAMES}, sampler)
    expected_next = Counter()
    for it in range(200):
        name, batch = loader.next_batch(it)
        assert name == sampler.task_for_iteration(it)
        assert batch == (name, expected_next[name])  # consecutive batches of that task only
        expected_next[name] += 1
    assert log == expected_next  # unsampled loaders were never advanced


def test_loader_not_started_until_sampled():
    started = []

    class Lazy:
        def __init__(self, name):
            self.name = name

        def __iter__(self):
            started.append(self.name)
            return itertools.repeat(self.name)

    sampler = UnmixedTaskSampler(["a", "b"], [0.5, 0.5], seed=0)
    loader = MultiTaskLoader({"a": Lazy("a"), "b": Lazy("b")}, sampler)
    name, _ = loader.next_batch(0)
    assert started == [name]


def test_mixed_sampler_returns_every_task_with_ratio_multipliers():
    sampler = MixedTaskSampler(NAMES, [10, 6, 3, 1])
    for it in (0, 1, 99):
        mult = sampler.tasks_for_iteration(it)
        assert list(mult) == list(NAMES)
        assert mult == pytest.approx(dict(zip(NAMES, RATIOS)))
    log = Counter()
    loader = MultiTaskLoader({n: _counting_loader(n, log) for n in NAMES}, sampler)
    for it in range(3):
        batches = loader.next_batches(it)
        assert batches == {n: (n, it) for n in NAMES}
    assert log == Counter({n: 3 for n in NAMES})
    with pytest.raises(TypeError, match="next_batches"):
        loader.next_batch(0)


@pytest.mark.parametrize(
    "names,ratios,match",
    [((), (), "empty"), (("a", "b"), (1.0,), "one ratio per task"), (("a", "b"), (1.0, 0.0), "'b'"),
     (("a", "b"), (1.0, -2.0), "'b'"), (("a", "b"), (float("nan"), 1.0), "'a'"), (("a", "a"), (1, 1), "unique"),
     (("a", ""), (1, 1), "non-empty")],
)
def test_bad_ratios_raise(names, ratios, match):
    for cls in (UnmixedTaskSampler, MixedTaskSampler):
        with pytest.raises(ValueError, match=match):
            cls(names, ratios)


def test_bad_usage_raises():
    with pytest.raises(ValueError, match="seed"):
        UnmixedTaskSampler(["a"], [1.0], seed=-1)
    sampler = UnmixedTaskSampler(["a", "b"], [1.0, 1.0])
    with pytest.raises(ValueError, match="it"):
        sampler.task_for_iteration(-1)
    with pytest.raises(ValueError, match=r"missing \['b'\], unexpected \['c'\]"):
        MultiTaskLoader({"a": [1], "c": [2]}, sampler)
    with pytest.raises(TypeError, match="sampler"):
        MultiTaskLoader({"a": [1]}, object())
    loader = MultiTaskLoader({"a": [], "b": []}, sampler)
    with pytest.raises(RuntimeError, match="exhausted"):
        loader.next_batch(0)
    with pytest.raises(TypeError, match="next_batch"):
        loader.next_batches(0)
