"""up2.modeling.beam_search against an independent brute force: on a tiny target set, a beam wide
enough to keep every sequence finds the sequence with the best length-normalised score
(sum log p / |y| ** length_penalty, |y| counting the end target); beam 1 is greedy decoding;
several images are decoded at once, each by its own scores."""
import itertools
import math

import pytest
import torch

from up2.modeling.beam_search import beam_search

WORDS, ENDS, FILLER = (0, 1), (2, 3), 3  # two words; two targets end a sequence (end, padding)
V, MAX_LEN = 4, 3
N_IMAGES = 6


def fake_logp(image: int, prefix) -> torch.Tensor:
    """(V,) log-probabilities of the next target after ``prefix``: a fixed random function of the
    image and the whole prefix (seeded by it)."""
    gen = torch.Generator().manual_seed(hash((image, *prefix)) & 0x7FFFFFFF)
    logits = 1.5 * torch.randn(V, generator=gen, dtype=torch.float64)
    logits[list(ENDS)] -= 1.0  # ends a little less likely, so the best sequences have several lengths
    return logits.log_softmax(0)


class FakeModel:
    """The ``step`` of beam_search for N images with K beams; checks the ``parents`` contract."""

    def __init__(self, n_images: int, beams: int):
        self.n, self.k, self.prev = n_images, beams, None

    def __call__(self, generated, parents):
        if parents is None:
            assert generated.shape == (self.n * self.k, 0)
        else:  # row j continues row parents[j] of the previous call
            assert torch.equal(generated[:, :-1], self.prev[parents])
        self.prev = generated
        rows = [fake_logp(r // self.k, tuple(generated[r].tolist())) for r in range(generated.shape[0])]
        return torch.stack(rows).float()


def brute_force(image: int, length_penalty: float):
    """(sequence, score) with the best sum log p / |y| ** lp over every sequence of at most MAX_LEN
    targets: words then one end target (|y| = its length), or MAX_LEN words cut (|y| = MAX_LEN + 1)."""
    candidates = []
    for n_words in range(MAX_LEN):
        for words in itertools.product(WORDS, repeat=n_words):
            candidates += [(words + (end,), n_words + 1) for end in ENDS]
    candidates += [(words, MAX_LEN + 1) for words in itertools.product(WORDS, repeat=MAX_LEN)]
    best, best_score = None, -math.inf
    for seq, length in candidates:
        total = sum(float(fake_logp(image, seq[:i])[t]) for i, t in enumerate(seq))
        score = total / length ** length_penalty
        if score > best_score:
            best, best_score = seq, score
    return best, best_score


def _search(n, k, lp):
    return beam_search(FakeModel(n, k), n, k, MAX_LEN, end_indices=ENDS, filler_index=FILLER, length_penalty=lp)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_wide_beam_finds_the_brute_force_best(length_penalty):
    n = N_IMAGES
    out = _search(n, 32, length_penalty)  # >= the 22 live sequences of the last step: exact
    for image in range(n):
        seq, score = brute_force(image, length_penalty)
        got = out.indices[image].tolist()
        assert tuple(got[: len(seq)]) == seq and all(t == FILLER for t in got[len(seq):])
        assert int(out.lengths[image]) == (len(seq) if seq[-1] in ENDS else MAX_LEN + 1)
        assert float(out.scores[image]) == pytest.approx(score, rel=1e-5, abs=1e-5)


def test_the_length_penalty_changes_the_answer():
    """The fake model is one where the penalty matters, so the test above can fail."""
    best = {lp: [brute_force(i, lp)[0] for i in range(N_IMAGES)] for lp in (0.0, 1.0, 2.0)}
    assert best[0.0] != best[1.0] != best[2.0]
    assert sum(map(len, best[2.0])) > sum(map(len, best[1.0])) > sum(map(len, best[0.0]))


def test_beam_one_is_greedy():
    n = 3
    out = _search(n, 1, 2.0)  # the penalty only re-ranks the final beams: none to re-rank
    for image in range(n):
        seq = []
        while len(seq) < MAX_LEN and (not seq or seq[-1] not in ENDS):
            seq.append(int(fake_logp(image, tuple(seq)).argmax()))
        assert out.indices[image].tolist()[: len(seq)] == seq


def test_batch_equals_single():
    batch = _search(3, 2, 2.0)
    for image in range(3):
        def one_image(generated, parents, image=image):
            return torch.stack([fake_logp(image, tuple(r.tolist())) for r in generated]).float()

        one = beam_search(one_image, 1, 2, MAX_LEN, ENDS, FILLER, 2.0)
        t = one.indices.shape[1]  # the batch may run longer (other images); then its row repeats the filler
        assert torch.equal(one.indices[0], batch.indices[image, :t]) and (batch.indices[image, t:] == FILLER).all()
        assert one.lengths[0] == batch.lengths[image]
        assert torch.allclose(one.scores[0], batch.scores[image])


@pytest.mark.parametrize("kwargs, match", [
    ({"beam_size": 0}, "beam_size must be an int >= 1"), ({"beam_size": 2.0}, "beam_size must be an int >= 1"),
    ({"max_length": True}, "max_length must be an int >= 1"),
    ({"length_penalty": -1.0}, "length_penalty must be a finite float >= 0"),
    ({"length_penalty": float("nan")}, "length_penalty"), ({"end_indices": ()}, "end_indices is empty"),
])
def test_bad_arguments(kwargs, match):
    args = {"batch_size": 1, "beam_size": 2, "max_length": 2, "end_indices": ENDS, "filler_index": FILLER,
            "length_penalty": 2.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        beam_search(FakeModel(1, 2), **args)


def test_step_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"\(N\*K, V\) = \(4, V\)"):
        beam_search(lambda g, p: torch.zeros(3, V), 2, 2, 2, ENDS, FILLER)
