"""The comm.gather path of all four evaluators: rank 0's result equals a single-process run on
the whole data; rank 1 returns {}.

The merge logic is checked in one process with ``detectron2.utils.comm`` patched (gather returns
fake per-rank lists: what each rank's evaluator handed to gather); one real 2-process gloo run
(``distributed_utils.run_gloo_workers``: file:// store, timeout, deterministic teardown) checks
the real communication end to end."""
import json
import os

import pytest
import torch

from distributed_utils import run_gloo_workers

WORLD = 2


def _data():
    g = torch.Generator().manual_seed(0)
    n = 12
    scores = torch.randn(n, 7, generator=g)
    labels = torch.randint(0, 7, (n,), generator=g).tolist()
    img = torch.randn(n, 8, generator=g)
    txt = [img[i] + torch.randn(3, 8, generator=g) for i in range(n)]
    mlm = torch.randint(0, 5, (n, 6), generator=g)
    mlm[torch.rand(n, 6, generator=g) > 0.5] = -100
    mlm_pred = torch.randint(0, 5, (n, 6), generator=g)
    words = ["a", "cat", "dog", "on", "the", "mat", "grass", "runs", "sits"]
    gts = {i: [" ".join(words[(i + k) % 9 : (i + k) % 9 + 4]) or "a cat" for k in range(3)] for i in range(n)}
    caps = {i: " ".join(words[i % 9 : i % 9 + 3]) or "a dog" for i in range(n)}
    return n, scores, labels, img, txt, mlm, mlm_pred, gts, caps


def _evaluators(distributed):
    from up2.evaluation import CaptioningEvaluator, ClassificationEvaluator, MaskedLMEvaluator, RetrievalEvaluator

    gts = _data()[7]
    return [ClassificationEvaluator(distributed=distributed), RetrievalEvaluator(distributed=distributed),
            CaptioningEvaluator(gts, distributed=distributed), MaskedLMEvaluator(distributed=distributed)]


def _process_all(evs, indices):
    """Feed the samples ``indices`` to every evaluator in ``evs``, 4 at a time."""
    n, scores, labels, img, txt, mlm, mlm_pred, gts, caps = _data()
    for ev in evs:
        ev.reset()
    for s in range(0, len(indices), 4):
        sel = indices[s : s + 4]
        inputs = [{"image_id": i, "class_id": labels[i], "mlm_labels": mlm[i]} for i in sel]
        outputs = [{"pred_class_scores": scores[i], "image_embedding": img[i], "text_embeddings": txt[i],
                    "caption": caps[i], "mlm_predictions": mlm_pred[i]} for i in sel]
        for ev in evs:
            ev.process(inputs, outputs)


def _evaluate_all(indices, distributed):
    evs = _evaluators(distributed)
    _process_all(evs, indices)
    results = {}
    for ev in evs:
        results.update(ev.evaluate())
    return results


def _shard(rank):
    return list(range(rank, 12, WORLD))  # interleaved shards like detectron2's InferenceSampler


def _assert_equals_single_process(rank0):
    single = _evaluate_all(list(range(12)), distributed=False)
    assert set(single) == set(rank0) == {"classification", "retrieval", "captioning", "mlm"}
    for task, metrics in single.items():
        assert set(rank0[task]) == set(metrics), task
        for k, v in metrics.items():
            assert abs(rank0[task][k] - v) < 1e-9, (task, k)


class _FakeComm:
    """``detectron2.utils.comm`` as seen by one rank of a WORLD-rank run: ``gather`` records what
    this rank sends and, on rank 0, returns the per-rank lists of all ranks (``sent[r]`` is the
    list of what rank r sent, in call order)."""

    def __init__(self, rank, sent):
        self.rank, self.sent, self.calls = rank, sent, 0

    def gather(self, data, dst=0, group=None):
        assert dst == 0
        self.sent[self.rank].append(data)
        self.calls += 1
        if self.rank != dst:
            return []  # detectron2's gather on a non-destination rank
        return [self.sent[r][self.calls - 1] for r in range(WORLD)]

    def install(self, monkeypatch):
        from detectron2.utils import comm

        monkeypatch.setattr(comm, "gather", self.gather)
        monkeypatch.setattr(comm, "synchronize", lambda: None)
        monkeypatch.setattr(comm, "get_rank", lambda: self.rank)
        monkeypatch.setattr(comm, "get_world_size", lambda: WORLD)
        monkeypatch.setattr(comm, "is_main_process", lambda: self.rank == 0)


@pytest.mark.parametrize("empty_rank", [None, 0, 1])
def test_gather_merge_in_one_process_equals_single_process(monkeypatch, empty_rank):
    """Each evaluator's evaluate() on rank 1 (sends its shard, returns {}), then on rank 0 (gets
    both shards from the patched gather): equals one process on all data. A rank whose shard is
    empty (fewer samples than ranks) still takes part and changes nothing."""
    shards = {r: _shard(r) for r in range(WORLD)}
    if empty_rank is not None:  # its samples go to the other rank
        other = 1 - empty_rank
        shards = {empty_rank: [], other: sorted(shards[0] + shards[1])}
    sent = {r: [] for r in range(WORLD)}
    per_rank = {}
    for rank in (1, 0):  # rank 0 last: its gather returns what rank 1 sent
        fake = _FakeComm(rank, sent)
        with monkeypatch.context() as m:
            fake.install(m)
            per_rank[rank] = _evaluate_all(shards[rank], distributed=True)
        assert fake.calls == 4, "one gather per evaluator"
    assert per_rank[1] == {}
    _assert_equals_single_process(per_rank[0])


def test_gather_order_of_ranks_does_not_matter(monkeypatch):
    """Rank 0 merges the ranks' records in any order: swapping the shards gives the same result."""
    sent = {r: [] for r in range(WORLD)}
    results = {}
    for rank, shard in ((1, _shard(0)), (0, _shard(1))):
        fake = _FakeComm(rank, sent)
        with monkeypatch.context() as m:
            fake.install(m)
            results[rank] = _evaluate_all(shard, distributed=True)
    _assert_equals_single_process(results[0])


def _worker(rank, out_dir):
    """One rank of the real run (run_gloo_workers sets up and tears down the group)."""
    from detectron2.utils import comm
    from up2.utils import write_json_atomic

    assert comm.get_world_size() == WORLD and comm.get_rank() == rank
    write_json_atomic(_evaluate_all(_shard(rank), distributed=True), os.path.join(out_dir, f"rank{rank}.json"))


def test_two_process_gather_equals_single_process(tmp_path):
    """The one real multi-process run of this feature (2 gloo processes)."""
    run_gloo_workers(_worker, tmp_path, args=(str(tmp_path),), world_size=WORLD)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank1 == {}
    _assert_equals_single_process(rank0)


def _retrieval_with_captions(indices, distributed):
    """RetrievalEvaluator(match_identical_captions=True) on the samples ``indices``: 3 captions per
    image drawn from 5 texts, so many texts are shared between images."""
    from up2.evaluation import RetrievalEvaluator

    n, scores, labels, img, txt, mlm, mlm_pred, gts, caps = _data()
    ev = RetrievalEvaluator(distributed=distributed, match_identical_captions=True)
    for i in indices:
        texts = [f"text {(2 * i + k) % 5}" for k in range(3)]
        ev.process([{"image_id": i, "captions": texts}], [{"image_embedding": img[i], "text_embeddings": txt[i]}])
    return ev.evaluate()


def test_gather_keeps_the_captions_of_every_rank(monkeypatch):
    """match_identical_captions through the gather: rank 0 groups the texts of both ranks' images."""
    sent = {r: [] for r in range(WORLD)}
    per_rank = {}
    for rank in (1, 0):
        fake = _FakeComm(rank, sent)
        with monkeypatch.context() as m:
            fake.install(m)
            per_rank[rank] = _retrieval_with_captions(_shard(rank), distributed=True)
    assert per_rank[1] == {}
    single = _retrieval_with_captions(list(range(12)), distributed=False)["retrieval"]
    rank0 = per_rank[0]["retrieval"]
    assert rank0.keys() == single.keys() and {f"strict_{k}" for k in ("i2t_R@1", "t2i_R@1")} <= rank0.keys()
    for k, v in single.items():
        assert abs(rank0[k] - v) < 1e-9, k
    assert rank0["t2i_R@1"] > rank0["strict_t2i_R@1"]  # the shared texts were matched across the ranks' images
