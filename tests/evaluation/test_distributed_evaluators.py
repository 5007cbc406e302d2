"""The comm.gather path of all four evaluators with 2 CPU processes (gloo): rank 0's result equals
a single-process run on the whole data; rank 1 returns {}."""
import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


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


def _evaluate_all(indices, distributed):
    from up2.evaluation import CaptioningEvaluator, ClassificationEvaluator, MaskedLMEvaluator, RetrievalEvaluator

    n, scores, labels, img, txt, mlm, mlm_pred, gts, caps = _data()
    evs = [ClassificationEvaluator(distributed=distributed), RetrievalEvaluator(distributed=distributed),
           CaptioningEvaluator(gts, distributed=distributed), MaskedLMEvaluator(distributed=distributed)]
    for ev in evs:
        ev.reset()
    for s in range(0, len(indices), 4):
        sel = indices[s : s + 4]
        inputs = [{"image_id": i, "class_id": labels[i], "mlm_labels": mlm[i]} for i in sel]
        outputs = [{"pred_class_scores": scores[i], "image_embedding": img[i], "text_embeddings": txt[i],
                    "caption": caps[i], "mlm_predictions": mlm_pred[i]} for i in sel]
        for ev in evs:
            ev.process(inputs, outputs)
    results = {}
    for ev in evs:
        results.update(ev.evaluate())
    return results


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        from detectron2.utils import comm

        assert comm.get_world_size() == 2
        indices = list(range(rank, 12, 2))  # interleaved shards like detectron2's InferenceSampler
        res = _evaluate_all(indices, distributed=True)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


def test_two_process_gather_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank1 == {}
    single = _evaluate_all(list(range(12)), distributed=False)
    assert set(rank0) == {"classification", "retrieval", "captioning", "mlm"}
    for task, metrics in single.items():
        for k, v in metrics.items():
            assert abs(rank0[task][k] - v) < 1e-9, (task, k)
