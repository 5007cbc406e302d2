"""Gather Feature (paper §4.4): with 2 gloo processes the retrieval loss and the DDP-averaged
gradients equal a single-process run on the concatenated batch, with caption keys too (pairs of
the same text on different ranks are no negatives of each other)."""
import torch
import torch.distributed as dist

from up2.modeling.likelihood import Likelihood
from up2.modeling.tasks.retrieval import retrieval_loss

from distributed_utils import run_gloo_workers, save_result

N, D_IN, D = 4, 6, 5
# caption keys of the global batch: text 0 on both ranks, text 1 on rank 0 twice and on rank 1
KEYS = torch.tensor([0, 1, 1, 2, 3, 0, 1, 4])


def _setup():
    torch.manual_seed(0)
    proj = torch.nn.Linear(D_IN, D)
    lik = Likelihood(init_temperature=0.1)
    x_img, x_txt = torch.randn(2 * N, D_IN), torch.randn(2 * N, D_IN)
    return proj, lik, x_img, x_txt


def _rank_loss_and_grads(rank, keys):
    """This rank's loss on its half of the batch (gathered negatives), and the gradients averaged
    over the ranks as DDP does; (mean loss over ranks, grads)."""
    proj, lik, x_img, x_txt = _setup()
    part = slice(rank * N, (rank + 1) * N)
    loss = retrieval_loss(proj(x_img[part]), proj(x_txt[part]), lik, gather=True,
                          keys=None if keys is None else keys[part])
    loss.backward()
    grads = [p.grad.clone() for p in (*proj.parameters(), lik.log_inv_tau)]
    for g in grads:  # what DDP does: average the gradients over ranks
        dist.all_reduce(g)
        g /= 2
    losses = [torch.zeros(()) for _ in range(2)]
    dist.all_gather(losses, loss.detach())
    return sum(losses) / 2, grads


def _worker(rank, out_path):
    """One rank (run_gloo_workers sets up and tears down the group): rank 0 saves losses and grads
    without and with caption keys."""
    result = {}
    for name, keys in (("plain", None), ("keys", KEYS)):
        loss, grads = _rank_loss_and_grads(rank, keys)
        result[name] = {"loss": loss, "grads": grads}
    if rank == 0:
        save_result(result, out_path)


def test_gathered_loss_and_gradients_equal_single_process(tmp_path):
    out = tmp_path / "rank0.pt"
    run_gloo_workers(_worker, tmp_path, args=(str(out),))
    saved = torch.load(out)

    for name, keys in (("plain", None), ("keys", KEYS)):
        ddp = saved[name]
        proj, lik, x_img, x_txt = _setup()
        loss = retrieval_loss(proj(x_img), proj(x_txt), lik, gather=False, keys=keys)
        loss.backward()
        assert torch.allclose(ddp["loss"], loss.detach(), atol=1e-5), name
        for g_ddp, p in zip(ddp["grads"], (*proj.parameters(), lik.log_inv_tau)):
            assert torch.allclose(g_ddp, p.grad, atol=1e-5), name
    assert not torch.allclose(saved["keys"]["loss"], saved["plain"]["loss"])  # the keys removed negatives


def test_without_gather_each_rank_sees_only_its_batch():
    proj, lik, x_img, x_txt = _setup()
    full = retrieval_loss(proj(x_img), proj(x_txt), lik, gather=False)
    halves = [retrieval_loss(proj(x_img[s]), proj(x_txt[s]), lik, gather=False) for s in (slice(0, N), slice(N, 2 * N))]
    assert not torch.allclose(full, sum(halves) / 2)  # fewer negatives -> a different (smaller) loss
    assert (sum(halves) / 2) < full
