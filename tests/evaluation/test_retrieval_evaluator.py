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
    """Sort every row of the cosine matrix and look at the top k, one query at a time (every
    caption its own text: only its image is right)."""
    return _brute_force_by_text(img, txt, [[(i, j) for j in range(t.shape[0])] for i, t in enumerate(txt)], ks)


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


# ---- identical caption texts (text_groups / match_identical_captions) ----------------------------


def _brute_force_by_text(img, txt, texts, ks=(1, 5, 10)):
    """As _brute_force, but a caption is right for every image that has a caption of its text."""
    owner = [i for i, t in enumerate(txt) for _ in range(t.shape[0])]
    flat = [t for per_image in texts for t in per_image]
    image_texts = [set(per_image) for per_image in texts]
    sim = F.normalize(img, dim=1) @ F.normalize(torch.cat(txt), dim=1).T  # (n, m)
    res = {}
    for k in ks:
        hits = 0
        for i in range(sim.shape[0]):
            order = sorted(range(sim.shape[1]), key=lambda j: -sim[i, j].item())
            hits += any(flat[j] in image_texts[i] for j in order[:k])
        res[f"i2t_R@{k}"] = 100.0 * hits / sim.shape[0]
        hits = 0
        for j in range(sim.shape[1]):
            order = sorted(range(sim.shape[0]), key=lambda i: -sim[i, j].item())
            hits += any(flat[j] in image_texts[i] for i in order[:k])
        res[f"t2i_R@{k}"] = 100.0 * hits / sim.shape[1]
    assert len(owner) == len(flat)
    return res


def _groups(texts):
    ids = {}
    return torch.tensor([ids.setdefault(t, len(ids)) for per_image in texts for t in per_image])


@pytest.mark.parametrize("caps", [1, 3])
def test_distinct_texts_give_the_strict_result(caps):
    img, txt = _random_set(caps=caps, vary=caps > 1, seed=4)
    owner = torch.repeat_interleave(torch.arange(len(txt)), torch.tensor([t.shape[0] for t in txt]))
    strict = retrieval_recalls(img, torch.cat(txt), owner)
    assert 0 < strict["i2t_R@1"] < 100  # a non-trivial case
    by_text = retrieval_recalls(img, torch.cat(txt), owner, chunk_size=3,
                                text_groups=torch.arange(owner.shape[0]) * 10)  # ids need not be contiguous
    assert by_text == pytest.approx(strict)


def test_repeated_texts_match_brute_force():
    img, txt = _random_set(n=16, caps=3, seed=5, noise=2.0)
    g = torch.Generator().manual_seed(6)
    words = torch.randint(0, 8, (16, 3), generator=g).tolist()  # 48 captions over at most 8 texts
    texts = [[f"text {w}" for w in row] for row in words]
    owner = torch.repeat_interleave(torch.arange(16), 3)
    ref = _brute_force_by_text(img, txt, texts)
    res = retrieval_recalls(img, torch.cat(txt), owner, chunk_size=5, text_groups=_groups(texts))
    assert res.keys() == ref.keys()
    for key in ref:
        assert res[key] == pytest.approx(ref[key]), key
    strict = retrieval_recalls(img, torch.cat(txt), owner)
    assert all(res[k] >= strict[k] for k in strict)  # more captions are right: never a lower recall
    assert any(res[k] > strict[k] for k in strict)


# Three images (unit axes) with one caption each; captions 0 and 1 are the same text "A".
#   cosines    cap0 [.2, 0, 1] "A"   cap1 [1, .1, 0] "A"   cap2 [1, 0, .5] "B"
#   img0 e0         0.196                0.995                 0.894
#   img1 e1         0                    0.0995                0
#   img2 e2         0.981                0                     0.447
# i2t rank (wrong captions above the best right one): strict img0 2 (cap1, cap2 above its own cap0),
#   img1 0, img2 1 (cap0); by text img0 0 (cap1 is "A" too and comes first), img1 0, img2 1.
# t2i rank: strict cap0 1 (img2), cap1 1 (img0), cap2 1 (img0); by text cap0 1 (img2 above img0,
#   the best "A" image), cap1 0 (img0 has "A"), cap2 1.
CASE_IMG = torch.eye(3)
CASE_TXT = torch.tensor([[0.2, 0.0, 1.0], [1.0, 0.1, 0.0], [1.0, 0.0, 0.5]])
CASE_TEXTS = ["A red circle", "a  red CIRCLE", "a blue square"]  # the first two are one text
CASE_STRICT = {"i2t_R@1": 100 / 3, "i2t_R@2": 200 / 3, "t2i_R@1": 0.0, "t2i_R@2": 100.0}
CASE_BY_TEXT = {"i2t_R@1": 200 / 3, "i2t_R@2": 100.0, "t2i_R@1": 100 / 3, "t2i_R@2": 100.0}


def test_shared_caption_counts_for_both_images():
    owner = torch.arange(3)
    assert retrieval_recalls(CASE_IMG, CASE_TXT, owner, ks=(1, 2)) == pytest.approx(CASE_STRICT)
    res = retrieval_recalls(CASE_IMG, CASE_TXT, owner, ks=(1, 2), chunk_size=1, text_groups=torch.tensor([5, 5, 2]))
    assert res == pytest.approx(CASE_BY_TEXT)
    with pytest.raises(ValueError, match=r"text_groups must have shape \(3,\)"):
        retrieval_recalls(CASE_IMG, CASE_TXT, owner, text_groups=torch.tensor([0, 1]))


def _case_evaluator(ev, with_captions=True):
    for i in range(3):
        inp = {"image_id": i, "captions": [CASE_TEXTS[i]]} if with_captions else {"image_id": i}
        ev.process([inp], [{"image_embedding": CASE_IMG[i], "text_embeddings": CASE_TXT[i : i + 1]}])
    return ev


def test_evaluator_matches_identical_captions_and_keeps_the_strict_numbers():
    res = _case_evaluator(RetrievalEvaluator(ks=(1, 2), match_identical_captions=True)).evaluate()["retrieval"]
    expected = dict(CASE_BY_TEXT, **{f"strict_{k}": v for k, v in CASE_STRICT.items()})
    assert res.keys() == expected.keys() and res == pytest.approx(expected)
    # the default (paper protocol) ignores the texts and reports only the strict numbers
    default = _case_evaluator(RetrievalEvaluator(ks=(1, 2))).evaluate()["retrieval"]
    assert default == pytest.approx(CASE_STRICT)


def test_retrieval_task_builds_the_evaluator_of_its_spec():
    from up2.modeling.tasks.base import TaskSpec
    from up2.modeling.tasks.retrieval import RetrievalTask

    spec = TaskSpec(name="RET", type="retrieval", datasets_train=("x",), datasets_test=(),
                    ims_per_batch=4, match_identical_captions=True)
    ev = RetrievalTask(spec).build_evaluator(None, "x")
    ev = _case_evaluator(ev)
    assert ev.evaluate()["retrieval"]["strict_i2t_R@1"] == pytest.approx(100 / 3)


def test_evaluator_needs_the_captions_when_matching():
    with pytest.raises(ValueError, match=r"image 0.*match_identical_captions needs its 'captions'.*got 0"):
        _case_evaluator(RetrievalEvaluator(match_identical_captions=True), with_captions=False)
    ev = RetrievalEvaluator(match_identical_captions=True)
    with pytest.raises(ValueError, match=r"one per text embedding, 2\), got 1"):
        ev.process([{"image_id": 0, "captions": ["a"]}], [{"image_embedding": torch.ones(3), "text_embeddings": torch.ones(2, 3)}])
