"""Fixed target sets through f_text and g (paper §4.2, Eq. 6): ``encode_text_targets`` for class
names and ``encode_vocabulary`` for vocabulary tokens.

Checked against an independent reference (one token at a time through the text encoder's
forward and g), with activation recomputation (values and gradients), across chunk sizes, for
the memory it keeps for the backward pass, and split across 2 gloo ranks (embeddings and the
DDP-averaged gradients equal one process's)."""
import os

import pytest
import torch

from up2.modeling.decoder_outputs import SPE
from up2.modeling.target_set import encode_targets, encode_text_targets, encode_vocabulary
from up2.modeling.text_encoder import TextEncoder
from up2.modeling.token_attributes import Modality, Role, TokenAttention, constant_attributes, input_modalities
from up2.modeling.unified_decoder import UnifiedDecoder
from up2.structures import TokenBatch

from conftest import tiny_cfg
from distributed_utils import run_gloo_workers, save_result

CAPTIONING_INPUTS = input_modalities(Modality.IMAGE, Modality.TEXT)
MLM_INPUTS = input_modalities(Modality.TEXT)
CLS_INPUTS = input_modalities(Modality.IMAGE)
IDS = [5, 17, 1000, 2040, 3, 999, 7]  # 7 tokens: an odd count, so 2 ranks need padding


def _modules(moe: bool = False, seed: int = 0):
    cfg = tiny_cfg(task_type=None)
    if moe:
        # no gate noise: in training each chunk would draw its own, and chunks would route differently
        cfg.merge_from_list(["MODEL.UNIFIED_DECODER.MOE.ENABLED", True, "MODEL.UNIFIED_DECODER.MOE.NUM_EXPERTS", 4,
                             "MODEL.UNIFIED_DECODER.MOE.NOISE_STD", 0.0])
    torch.manual_seed(seed)
    return TextEncoder(cfg), UnifiedDecoder(cfg)


def _reference(te, g, ids):
    """Token by token: ``cls v sep`` through the encoder's forward, then g with [SPE]."""
    sp = te.special_ids
    rows = []
    for v in ids:
        seq = torch.tensor([[sp.cls, v, sp.sep]])
        feats, pad = te(seq, torch.ones_like(seq))
        attr = constant_attributes(1, 3, modality=Modality.TEXT, role=Role.TARGET,
                                   attention=TokenAttention.BIDIRECTIONAL, inputs=CAPTIONING_INPUTS)
        rows.append(g(TokenBatch(tokens=feats, padding_mask=pad, attributes=attr), read=(SPE,)).spe)
    return torch.cat(rows)


def test_vocabulary_is_encoded_by_the_full_text_encoder():
    te, g = _modules()
    ids = torch.tensor(IDS)
    with torch.no_grad():
        got = encode_vocabulary(te, g, ids, CAPTIONING_INPUTS, chunk_tokens=9).embeddings
        torch.testing.assert_close(got, _reference(te, g, IDS), rtol=1e-4, atol=1e-5)
        # a weight of the encoder's last transformer layer (not the embedding layer) changes them
        layer = te.model.encoder.layer[-1].output.dense
        layer.weight.add_(0.05 * torch.randn_like(layer.weight))
        changed = encode_vocabulary(te, g, ids, CAPTIONING_INPUTS, chunk_tokens=9).embeddings
    assert (changed - got).abs().max() > 1e-3


def _assert_same_values_and_gradients(emb, grads, ref, ref_grads):
    """Embeddings and per-parameter gradients equal a reference's within float tolerance (an
    unused parameter may have no gradient or a zero one). A gradient element is a sum whose
    terms can cancel, so its rounding error scales with the tensor's largest entries, not with
    the element: the absolute tolerance is 1e-5 of the tensor's largest magnitude (at least 1e-5)."""
    torch.testing.assert_close(emb, ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("moe", [False, True])
def test_recompute_and_chunks_give_the_same_values_and_gradients(moe):
    te, g = _modules(moe=moe)
    ids = torch.tensor(IDS)
    proj = torch.randn(len(IDS), 32, generator=torch.Generator().manual_seed(1))  # d = 32 in tiny_cfg
    params = [p for p in (*te.parameters(), *g.parameters()) if p.requires_grad]

    def run(chunk, recompute):
        out = encode_vocabulary(te, g, ids, CAPTIONING_INPUTS, chunk_tokens=3 * chunk, recompute=recompute)
        loss = (out.embeddings * proj).sum() + (out.aux_loss if out.aux_loss is not None else 0.0)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return out.embeddings.detach(), grads

    plain, plain_grads = run(len(IDS), False)
    for chunk, recompute in ((len(IDS), True), (3, True), (2, False)):
        emb, grads = run(chunk, recompute)
        _assert_same_values_and_gradients(emb, grads, plain, plain_grads)
    # the encoder's transformer layers and g receive gradient through the vocabulary targets
    named = dict(zip([n for n, p in (*te.named_parameters(), *g.named_parameters()) if p.requires_grad], plain_grads))
    assert named["model.encoder.layer.0.attention.self.query.weight"].abs().sum() > 0
    assert sum(v.abs().sum() for k, v in named.items() if v is not None and k.startswith("layers")) > 0


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward pass while ``fn`` runs (outside
    activation-checkpointed regions, whose own hooks replace what they save)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_recompute_keeps_a_fraction_of_the_activations():
    te, g = _modules()
    ids = torch.arange(40, 104)  # 64 tokens, 4 chunks
    plain = _saved_bytes(lambda: encode_vocabulary(te, g, ids, MLM_INPUTS, chunk_tokens=48, recompute=False))
    kept = _saved_bytes(lambda: encode_vocabulary(te, g, ids, MLM_INPUTS, chunk_tokens=48, recompute=True))
    assert plain > 0
    assert kept < plain / 20, (kept, plain)


def test_class_names_in_recomputed_chunks_match_one_pass():
    """Texts of different lengths (padding inside a chunk), 3 chunks, recomputed: the values and
    gradients of one plain pass (``TextEncoder.encode`` then g), with a small fraction kept."""
    te, g = _modules(moe=True)
    names = ["cat", "traffic light", "a very long class name with many words", "dog", "hair drier", "tv"]
    batch = te.tokenize(names)
    proj = torch.randn(len(names), 32, generator=torch.Generator().manual_seed(2))
    params = [p for p in (*te.parameters(), *g.parameters()) if p.requires_grad]

    def grads_of(fn):
        emb = fn()
        return emb.detach(), torch.autograd.grad((emb * proj).sum(), params, allow_unused=True)

    ref, ref_grads = grads_of(lambda: encode_targets(g, *te.encode(names), CLS_INPUTS).embeddings)
    got, got_grads = grads_of(lambda: encode_text_targets(te, g, batch["input_ids"], batch["attention_mask"],
                                                          CLS_INPUTS, chunk_tokens=2 * batch["input_ids"].shape[1],
                                                          recompute=True).embeddings)
    _assert_same_values_and_gradients(got, got_grads, ref, ref_grads)
    plain = _saved_bytes(lambda: encode_targets(g, *te.encode(names), CLS_INPUTS))
    kept = _saved_bytes(lambda: encode_text_targets(te, g, batch["input_ids"], batch["attention_mask"],
                                                    CLS_INPUTS, chunk_tokens=2 * batch["input_ids"].shape[1], recompute=True))
    assert kept < plain / 20, (kept, plain)


def test_bad_vocabulary_arguments_are_refused():
    te, g = _modules()
    with pytest.raises(ValueError, match="non-empty"):
        encode_vocabulary(te, g, torch.zeros(0, dtype=torch.long), MLM_INPUTS, chunk_tokens=12)
    with pytest.raises(ValueError, match="chunk"):
        encode_vocabulary(te, g, torch.tensor([3]), MLM_INPUTS, chunk_tokens=0)
    with pytest.raises(ValueError, match="input_ids must lie"):
        encode_vocabulary(te, g, torch.tensor([10**9]), MLM_INPUTS, chunk_tokens=12)
    with pytest.raises(ValueError, match="same shape"):
        encode_text_targets(te, g, torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4), MLM_INPUTS, chunk_tokens=12)


def _loss_and_grads(te, g, emb, rank):
    proj = torch.randn(emb.shape, generator=torch.Generator().manual_seed(100 + rank))
    loss = (emb * proj).sum()
    params = [p for p in (*te.parameters(), *g.parameters()) if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


def _shard_worker(rank, out_dir):
    import torch.distributed as dist

    te, g = _modules()
    emb = encode_vocabulary(te, g, torch.tensor(IDS), CAPTIONING_INPUTS, chunk_tokens=6, recompute=True,
                            shard=True).embeddings
    grads = _loss_and_grads(te, g, emb, rank)
    grads = [torch.zeros(()) if x is None else x.clone() for x in grads]
    for x in grads:  # what DDP does: the mean over ranks
        dist.all_reduce(x)
        x /= dist.get_world_size()
    save_result({"emb": emb.detach(), "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_sharded_vocabulary_matches_one_process(tmp_path):
    run_gloo_workers(_shard_worker, tmp_path, args=(str(tmp_path),))
    te, g = _modules()
    emb = encode_vocabulary(te, g, torch.tensor(IDS), CAPTIONING_INPUTS, chunk_tokens=3 * len(IDS)).embeddings
    per_rank = [_loss_and_grads(te, g, emb, r) for r in range(2)]  # the mean loss of the 2 ranks
    expected = [None if a is None else (a + b) / 2 for a, b in zip(*per_rank)]
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        torch.testing.assert_close(got["emb"], emb.detach(), rtol=1e-4, atol=1e-5)
        for a, b in zip(got["grads"], expected):
            if b is None:
                assert a.abs().max() == 0
            else:  # tolerance as in _assert_same_values_and_gradients
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * max(1.0, float(b.abs().max())))
