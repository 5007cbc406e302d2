"""Image-text retrieval through the public API (``model(inputs, task="RET")`` and
``RetrievalEvaluator``): the contrastive loss reaches the text encoder and, after a few steps,
prefers the true image-caption pairs to shuffled ones; eval embeddings feed the evaluator. Pairs
with the same caption text are no in-batch negatives (``retrieval_loss(keys=)``), checked against
a cross-entropy written out by hand."""
import copy

import pytest
import torch

import torch.nn.functional as F

from task_models import mapped_inputs, tiny_model
from up2.evaluation import RetrievalEvaluator
from up2.modeling.likelihood import Likelihood
from up2.modeling.tasks.retrieval import caption_keys, retrieval_loss


@pytest.fixture(scope="module")
def ret_model(shapes_datasets):
    return tiny_model({"RET": ("retrieval", {})})


def _train_inputs(cfg, model, n=4):
    torch.manual_seed(0)
    inputs = mapped_inputs(cfg, model, "RET", n=n, is_train=True)
    for x in inputs:  # a fixed caption per image (the mapper may draw one of them)
        x["caption"] = x["captions"][0]
    return inputs


def _loss(model, inputs):
    torch.manual_seed(0)  # the same dropout masks for every call
    return model(inputs, task="RET")["loss_retrieval"]


def test_loss_is_finite_and_reaches_the_text_encoder(ret_model):
    cfg, model = ret_model
    model.train()
    loss = _loss(model, _train_inputs(cfg, model))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    text_grads = [p.grad for p in model.text_encoder.parameters() if p.grad is not None]
    image_grads = [p.grad for p in model.image_encoder.parameters() if p.grad is not None]
    assert text_grads and sum(g.norm() for g in text_grads) > 1e-6
    assert image_grads and sum(g.norm() for g in image_grads) > 1e-6
    model.zero_grad(set_to_none=True)


def test_after_a_few_steps_true_pairs_score_better_than_shuffled(ret_model):
    cfg, model = ret_model
    model = copy.deepcopy(model).train()
    inputs = _train_inputs(cfg, model)
    shuffled = [dict(x, caption=inputs[(i + 1) % len(inputs)]["caption"]) for i, x in enumerate(inputs)]
    assert len({x["caption"] for x in inputs}) == len(inputs)  # the roll really mismatches every pair
    # lr 0.03: at 0.1 the first step removes the random spread of the initial logits (4 pairs,
    # loss ~2.0 > ln 4) by collapsing them, and 3 steps then leave the loss at ln 4
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.03)
    for _ in range(5):
        opt.zero_grad()
        _loss(model, inputs).backward()
        opt.step()
    with torch.no_grad():
        matched, mismatched = _loss(model, inputs).item(), _loss(model, shuffled).item()
    assert matched < mismatched - 0.1, (matched, mismatched)


def test_eval_embeddings_feed_the_evaluator(ret_model):
    cfg, model = ret_model
    inputs = mapped_inputs(cfg, model, "RET", n=4)
    model.eval()
    with torch.no_grad():
        out = model(inputs, task="RET")
    assert len(out) == len(inputs)
    d = out[0]["image_embedding"].shape[0]
    for x, o in zip(inputs, out):
        img, txt = o["image_embedding"], o["text_embeddings"]
        assert img.shape == (d,) and txt.shape == (len(x["captions"]), d)
        assert img.dtype == txt.dtype == torch.float32 and torch.isfinite(img).all() and torch.isfinite(txt).all()
        assert img.norm() > 0 and (txt.norm(dim=1) > 0).all()  # cosine similarity is defined
    ev = RetrievalEvaluator(ks=(1, 4), distributed=False)
    ev.reset()
    ev.process(inputs, out)
    res = ev.evaluate()["retrieval"]
    assert all(0.0 <= res[k] <= 100.0 for k in ("i2t_R@1", "t2i_R@1"))
    assert res["t2i_R@4"] == pytest.approx(100.0)  # 4 images: every caption finds its image in the top 4


def test_eval_embeddings_do_not_depend_on_the_batch(ret_model):
    cfg, model = ret_model
    inputs = mapped_inputs(cfg, model, "RET", n=3)
    model.eval()
    with torch.no_grad():
        batch = model(inputs, task="RET")
        single = model(inputs[1:2], task="RET")[0]
    torch.testing.assert_close(batch[1]["image_embedding"], single["image_embedding"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batch[1]["text_embeddings"], single["text_embeddings"], rtol=1e-4, atol=1e-5)


TAU = 0.1


def _pairs(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, requires_grad=False), torch.randn(n, d, generator=g)


def _hand_loss(img, txt, keys):
    """Symmetric InfoNCE, one query at a time: row i's softmax runs over its positive and the
    columns whose key differs from key i (the columns of the same text are removed)."""
    sim = (F.normalize(img, dim=1) @ F.normalize(txt, dim=1).T / TAU).double()  # (N, N)
    keys = keys.tolist()
    total = 0.0
    for logits in (sim, sim.T):  # image->text, text->image
        for i in range(len(keys)):
            kept = [j for j in range(len(keys)) if j == i or keys[j] != keys[i]]
            total += -logits[i, i] + torch.logsumexp(logits[i, kept], dim=0)
    return total / (2 * len(keys))


def test_caption_keys_equal_exactly_for_the_same_text():
    keys = caption_keys(["Two shapes on a  gray background", "two shapes on a gray background ",
                         "a red circle", "two shapes on a grey background"])
    assert keys.dtype == torch.int64 and keys.shape == (4,)
    assert keys[0] == keys[1]  # case and spaces do not matter
    assert len({keys[0].item(), keys[2].item(), keys[3].item()}) == 3


def test_loss_with_keys_equals_the_cross_entropy_without_the_duplicate_columns():
    img, txt = _pairs()
    keys = torch.tensor([7, 3, 7, 9, 3, 7])  # texts 0, 2, 5 are one caption; 1 and 4 another
    lik = Likelihood(init_temperature=TAU)
    loss = retrieval_loss(img, txt, lik, gather=False, keys=keys)
    ref = _hand_loss(img, txt, keys)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    plain = retrieval_loss(img, txt, lik, gather=False)
    assert loss.item() < plain.item()  # fewer negatives


def test_distinct_keys_give_the_plain_loss():
    img, txt = _pairs(seed=1)
    lik = Likelihood(init_temperature=TAU)
    keys = caption_keys([f"caption {i}" for i in range(img.shape[0])])
    with_keys = retrieval_loss(img, txt, lik, gather=True, keys=keys)  # one process: gather is a no-op
    torch.testing.assert_close(with_keys, retrieval_loss(img, txt, lik, gather=False))
    assert with_keys.item() == pytest.approx(_hand_loss(img, txt, keys).item(), rel=1e-5)


def test_gradient_flows_and_ignores_the_removed_columns():
    img, txt = _pairs(seed=2)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    keys = torch.tensor([1, 2, 1, 3, 4, 5])
    lik = Likelihood(init_temperature=TAU)
    loss = retrieval_loss(img, txt, lik, gather=False, keys=keys)
    loss.backward()
    for name, t in (("img", img), ("txt", txt), ("log_inv_tau", lik.log_inv_tau)):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.norm() > 1e-4, name
    # the hand-written reference has the same gradient
    img2, txt2 = img.detach().clone().requires_grad_(True), txt.detach().clone().requires_grad_(True)
    _hand_loss(img2, txt2, keys).backward()
    torch.testing.assert_close(img.grad, img2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(txt.grad, txt2.grad, rtol=1e-4, atol=1e-6)


def test_all_duplicate_batch_has_zero_loss_and_finite_gradients():
    img, txt = _pairs(seed=3)
    img.requires_grad_(True)
    keys = caption_keys(["two shapes on a gray background"] * img.shape[0])
    loss = retrieval_loss(img, txt, Likelihood(init_temperature=TAU), gather=False, keys=keys)
    assert loss.item() == 0.0  # every query's only candidate is its own pair
    loss.backward()
    assert torch.isfinite(img.grad).all() and img.grad.abs().max() == 0.0


def test_keys_of_the_wrong_shape_are_refused():
    img, txt = _pairs()
    with pytest.raises(ValueError, match=r"keys must have shape \(6,\).*\(5,\)"):
        retrieval_loss(img, txt, Likelihood(), gather=False, keys=torch.arange(5))


def test_task_loss_is_zero_when_every_caption_is_the_same(ret_model):
    """Through the model: the task passes its captions' keys, so a batch of one repeated caption
    has no negative at all."""
    cfg, model = ret_model
    model.train()
    inputs = [dict(x, caption="Two shapes on a gray background") for x in _train_inputs(cfg, model)]
    assert _loss(model, inputs).item() == 0.0
    distinct = _train_inputs(cfg, model)
    assert len({x["caption"] for x in distinct}) == len(distinct) and _loss(model, distinct).item() > 0.1
