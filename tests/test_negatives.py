"""NegLabel: the log-space score from per-group log-sum-exps (against float64 sums of
exponentials), the fixed grouping, and negative-label mining (rule, determinism, cache)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from deltakern.core.neglabel import negative_group_order, neglabel_log_share


def _share_brute(logits_id: torch.Tensor, logits_neg: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean over groups of sum(e^id) / (sum(e^id) + sum(e^neg_g)), in float64 with exponentials."""
    order = negative_group_order(logits_neg.shape[1], groups)
    neg = logits_neg[:, order].reshape(logits_neg.shape[0], groups, -1)
    shift = torch.maximum(logits_id.max(1).values, neg.amax((1, 2)))[:, None]
    sid = torch.exp(logits_id - shift).sum(1, keepdim=True)
    sneg = torch.exp(neg - shift[:, :, None]).sum(2)
    return (sid / (sid + sneg)).mean(1)


@pytest.mark.parametrize("groups", [1, 3, 7])
def test_log_share_equals_the_share_of_softmax_mass(groups):
    g = torch.Generator().manual_seed(0)
    ell_id = torch.randn(50, 11, generator=g, dtype=torch.float64) * 5
    ell_neg = torch.randn(50, 23, generator=g, dtype=torch.float64) * 5 + 2
    order = negative_group_order(23, groups)
    grouped = ell_neg[:, order].reshape(50, groups, -1)
    got = neglabel_log_share(torch.logsumexp(ell_id, 1), torch.logsumexp(grouped, 2))
    torch.testing.assert_close(got.exp(), _share_brute(ell_id, ell_neg, groups), rtol=1e-12, atol=0)


def test_confident_rows_keep_their_digits():
    # The ID mass dominates by e^50: the share is 1 - 2e-22, whose log is -2e-22 exactly enough.
    lse_id = torch.tensor([60.0], dtype=torch.float64)
    lse_neg = torch.tensor([[10.0]], dtype=torch.float64)
    got = float(neglabel_log_share(lse_id, lse_neg))
    assert got == pytest.approx(-math.exp(-50.0), rel=1e-12)
    assert got < 0  # a subtraction of exponentials (1 - share) would give exactly 0 here


def test_negatives_dominating():
    got = float(neglabel_log_share(torch.tensor([0.0]), torch.tensor([[40.0]])))
    assert got == pytest.approx(-40.0, rel=1e-12)  # log(e^0 / (e^0 + e^40)) = -40 - log1p(e^-40)


def test_group_order_is_fixed_and_drops_the_remainder():
    a, b = negative_group_order(103, 10), negative_group_order(103, 10)
    assert torch.equal(a, b) and a.numel() == 100 and len(set(a.tolist())) == 100
    assert torch.equal(negative_group_order(7, 1), torch.arange(7))
    assert not torch.equal(negative_group_order(103, 10, seed=1), a)


# ---- mining ---------------------------------------------------------------------------------

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def clip():
    from deltakern.clip.models import TINY_MODEL, load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(TINY_MODEL, "none", device="cpu", seed=0)


VOCAB = ["apple", "river", "keyboard", "cat", "mountain", "violin", "Cat", "spoon", "cloud", "tiger", "lamp", "river"]
ID = ["cat", "dog", "bird"]


def test_selection_rule_against_numpy():
    from deltakern.clip.negatives import select_negatives

    g = torch.Generator().manual_seed(3)
    cand, ids = torch.randn(40, 16, generator=g), torch.randn(9, 16, generator=g)
    index, closeness = select_negatives(cand, ids, 12, 0.95)
    c = cand.double().numpy()
    w = ids.double().numpy()
    sim = (c / np.linalg.norm(c, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    q = np.quantile(sim, 0.95, axis=1)
    want = np.argsort(q, kind="stable")[:12]
    assert index.tolist() == want.tolist()
    np.testing.assert_allclose(closeness.numpy(), q[want], rtol=1e-12)


def test_mining_is_deterministic_cached_and_keyed(clip, tmp_path):
    from deltakern.clip.negatives import mine_negative_labels

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    cache = tmp_path / "cache"
    first = mine_negative_labels(clip, ID, vocab, 4, ["a photo of a {}."], cache_dir=cache)
    assert len(first.names) == 4 and "cat" not in [n.lower() for n in first.names]
    assert len(set(first.names)) == 4  # duplicates ("river") counted once
    files = sorted(p.name for p in cache.glob("negatives-*.safetensors"))
    assert len(files) == 1
    again = mine_negative_labels(clip, ID, vocab, 4, ["a photo of a {}."], cache_dir=cache)
    assert again.names == first.names and torch.equal(again.embeddings, first.embeddings)
    # Selection follows the rule: the mined rows are the farthest candidates.
    assert bool((first.closeness[1:] >= first.closeness[:-1]).all())
    torch.testing.assert_close(torch.linalg.vector_norm(first.embeddings, dim=1), torch.ones(4))

    # A changed vocabulary, class list or m is another cache entry.
    vocab.write_text("\n".join(VOCAB + ["harbour"]) + "\n")
    mine_negative_labels(clip, ID, vocab, 4, ["a photo of a {}."], cache_dir=cache)
    mine_negative_labels(clip, ID + ["fish"], vocab, 4, ["a photo of a {}."], cache_dir=cache)
    mine_negative_labels(clip, ID, vocab, 5, ["a photo of a {}."], cache_dir=cache)
    assert len(list(cache.glob("negatives-*.safetensors"))) == 4


def test_a_mined_set_is_found_without_the_model(clip, tmp_path):
    from deltakern.clip.negatives import find_mined_negative_labels, mine_negative_labels

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    cache = tmp_path / "cache"
    templates = ["a photo of a {}."]
    find = lambda **kw: find_mined_negative_labels(clip.name, kw.pop("pretrained", "none"), ID, vocab, 4, templates,  # noqa: E731
                                                   cache_dir=cache, **kw)  # fmt: skip
    assert find() is None  # never mined
    mined = mine_negative_labels(clip, ID, vocab, 4, templates, cache_dir=cache)
    for found in (find(), find(pretrained="None")):  # any spelling of random weights is the same key
        assert found.names == mined.names and torch.equal(found.embeddings, mined.embeddings)
        assert torch.equal(found.closeness, mined.closeness)
    # Random weights of another seed, other weights, or mining under bf16 autocast are another entry.
    assert find(seed=1) is None and find(pretrained="laion2b_s34b_b79k") is None
    assert find(autocast_dtype=torch.bfloat16) is None
    with pytest.raises(ValueError, match="n_negative=11 exceeds"):
        find_mined_negative_labels(clip.name, "none", ID, vocab, 11, templates, cache_dir=cache)


def test_mining_bad_arguments(clip, tmp_path):
    from deltakern.clip.negatives import mine_negative_labels

    vocab = tmp_path / "v.txt"
    vocab.write_text("cat\nriver\n")
    with pytest.raises(ValueError, match="n_negative=2 exceeds the 1 usable vocabulary entries"):
        mine_negative_labels(clip, ID, vocab, 2, ["a {}."], cache_dir=tmp_path)
    with pytest.raises(ValueError, match="negative_labels must be a text file"):
        mine_negative_labels(clip, ID, tmp_path / "missing.txt", 1, ["a {}."], cache_dir=tmp_path)
