"""RetrievalEvaluator / retrieval_recalls against a brute-force Python loop."""
import logging

import pytest
import torch
import torch.nn.functional as F

from up2.evaluation import RetrievalEvaluator, retrieval_recalls


def _random_set(n=20, caps=5, d=16, noise=1.5, seed=0, vary=False):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=g)
    counts = [caps - (i % 3 if vary else 0) for i in range(n)]
    txt = [img[i] + noise * torch.randn(c, d, generator=g) for i, c in enumerate(counts)]
    return img, txt


def _brute_force(img, txt, ks=(1, 5, 10)):
    """Sort every row of the cosine matrix and look at the top k, one query at a time."""
    owner = [i for i, t in enumerate(txt) for _ in range(t.shape[0])]
    sim = F.normalize(img, dim=1) @ F.normalize(torch.cat(txt), dim=1).T  # (n, m)
    res = {}
    for k in ks:
        hits = 0
        for i in range(sim.shape[0]):
            order = sorted(range(sim.shape[1]), key=lambda j: -sim[i, j].item())
            hits += any(owner[j] == i for j in order[:k])
        res[f"i2t_R@{k}"] = 100.0 * hits / sim.shape[0]
        hits = 0
        for j in range(sim.shape[1]):
            order = sorted(range(sim.shape[0]), key=lambda i: -sim[i, j].item())
            hits += owner[j] in order[:k]
        res[f"t2i_R@{k}"] = 100.0 * hits / sim.shape[1]
    return res


def _evaluate(img, txt, ids=None, batch=4, order=None, **kw):
    ev = RetrievalEvaluator(**kw)
    ids = list(range(len(txt))) if ids is None else ids
    order = list(range(len(txt))) if order is None else order
    for s in range(0, len(order), batch):
        sel = order[s : s + batch]
        outputs = [{"image_embedding": img[i], "text_embeddings": txt[i]} for i in sel]
        ev.process([{"image_id": ids[i]} for i in sel], outputs)
    return ev.evaluate()


@pytest.mark.parametrize("vary", [False, True])
def test_matches_brute_force(vary):
    img, txt = _random_set(vary=vary)
    ref = _brute_force(img, txt)
    assert 0 < ref["i2t_R@1"] < 100 and 0 < ref["t2i_R@5"] < 100  # a non-trivial case
    res = _evaluate(img, txt, chunk_size=7)["retrieval"]
    assert res.keys() == ref.keys()
    for key in ref:
        assert res[key] == pytest.approx(ref[key]), key


def test_order_of_arrival_and_chunking_do_not_matter():
    img, txt = _random_set(seed=1, vary=True)
    base = _evaluate(img, txt)
    perm = torch.randperm(len(txt), generator=torch.Generator().manual_seed(2)).tolist()
    assert _evaluate(img, txt, order=perm, batch=3, chunk_size=1) == base


def test_perfect_and_degenerate_embeddings():
    img = torch.eye(12, 16)
    txt = [img[i].expand(3, 16) * (1 + torch.arange(3.0))[:, None] for i in range(12)]  # same direction
    res = _evaluate(img, txt)["retrieval"]
    assert all(v == 100.0 for v in res.values())
    same = [torch.ones(3, 16) for _ in range(12)]  # every score ties: no luck allowed
    res = _evaluate(torch.ones(12, 16), same, ks=(1, 10))["retrieval"]
    assert res == {"i2t_R@1": 0.0, "i2t_R@10": 0.0, "t2i_R@1": 0.0, "t2i_R@10": 0.0}


def test_bf16_and_repeated_ids(caplog):
    img, txt = _random_set(n=10, seed=3)
    ref = _evaluate(img.bfloat16().float(), [t.bfloat16().float() for t in txt])
    ev = RetrievalEvaluator()
    outputs = [{"image_embedding": img[i].bfloat16(), "text_embeddings": txt[i].bfloat16()} for i in range(10)]
    ev.process([{"image_id": i} for i in range(10)], outputs)
    ev.process([{"image_id": 0}], [{"image_embedding": img[0], "text_embeddings": txt[0]}])
    with caplog.at_level(logging.WARNING, logger="up2.evaluation.retrieval"):
        assert ev.evaluate() == ref
    assert "1 repeated image_id" in caplog.text


def test_empty_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="up2.evaluation.retrieval"):
        assert RetrievalEvaluator().evaluate() == {}
    assert "did not receive any prediction" in caplog.text


@pytest.mark.parametrize(
    "out, match",
    [
        ({"text_embeddings": torch.zeros(5, 8)}, "image_embedding"),
        ({"image_embedding": torch.zeros(8)}, "text_embeddings"),
        ({"image_embedding": torch.zeros(1, 8), "text_embeddings": torch.zeros(5, 8)}, r"'image_embedding'.*\(d,\)"),
        ({"image_embedding": torch.zeros(8), "text_embeddings": torch.zeros(5, 4)}, r"'text_embeddings'.*d=8"),
        ({"image_embedding": torch.zeros(8), "text_embeddings": torch.zeros(0, 8)}, r"'text_embeddings'.*n_i >= 1"),
    ],
)
def test_bad_input(out, match):
    with pytest.raises(ValueError, match=match):
        RetrievalEvaluator().process([{"image_id": 7}], [out])


def test_bad_input_functional():
    with pytest.raises(ValueError, match="same d"):
        retrieval_recalls(torch.zeros(3, 4), torch.zeros(3, 5), torch.arange(3))
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_recalls(torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        retrieval_recalls(torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="text_emb contains NaN"):
        retrieval_recalls(torch.ones(2, 4), torch.tensor([[float("nan")] * 4, [1.0] * 4]), torch.arange(2))
    ev = RetrievalEvaluator()
    ev.process([{"image_id": 0}, {"image_id": 1}], [
        {"image_embedding": torch.zeros(4), "text_embeddings": torch.zeros(1, 4)},
        {"image_embedding": torch.zeros(6), "text_embeddings": torch.zeros(1, 6)},
    ])
    with pytest.raises(ValueError, match="widths differ"):
        ev.evaluate()
