"""WeLore: the official init (VITA-Group/welore ``lib/LowRankLayer.py``) transcribed in torch and
the official rank rule (``utils.py: adaptive_rank_pruning``) transcribed in numpy as independent
references, hand-computed rank selections, the Eckart-Young optimality of the factors, per-slice
ranks of stacked kernels, and bad inputs.

Tolerances: float32 products against float64 numpy / float32 torch SVDs 1e-5 (single factors
against torch 5e-5, see the test; 1e-4 relative for the Frobenius error, a difference of two O(1)
norms); rank choices and thresholds exact.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from effjax.peft import combine, inject, materialize, split, summary
from effjax.peft.welore import (
    WeLore,
    WeLoreWeight,
    welore_ranks,
    welore_rules,
    welore_spectra,
    welore_threshold,
)
from tests.peft.conformance_case import perturb as _perturb


def _with_spectrum(s, n_in, n_out, seed):
    """A float32 (n_in, n_out) matrix Q1 diag(s) Q2^T with the given singular values."""
    rng = np.random.default_rng(seed)
    q1 = np.linalg.qr(rng.standard_normal((n_in, n_in)))[0][:, :len(s)]
    q2 = np.linalg.qr(rng.standard_normal((n_out, n_out)))[0][:, :len(s)]
    return jnp.asarray((q1 * np.asarray(s, np.float64)) @ q2.T, jnp.float32)


def official_low_rank_layer(weight_t, k):
    """LowRankLayer(k, weight) in torch layout (out, in): returns (U.weight, V.weight)."""
    U, S, V = torch.svd(weight_t.to(torch.float32))
    U, S, V = U[:, :k], S[:k], V[:, :k]
    return U.mul(S.sqrt()), V.t().mul(S.sqrt().view(-1, 1))


def official_rank_pruning(spectra, rank_thresold):
    """adaptive_rank_pruning: {name: number of singular values pruned}, in float64 numpy."""
    out = {}
    for name, data in spectra.items():
        _data = (data - min(data)) / (max(data) - min(data))
        out[name] = int(sum(_data < rank_thresold))
    return out


@pytest.mark.parametrize("shape,rank", [((12, 10), 3), ((6, 14), 6), ((9, 9), 1)])
def test_factors_match_the_official_low_rank_layer(shape, rank):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    node = WeLore(rank=rank).adapt(jax.random.key(0), jnp.asarray(w))
    assert isinstance(node, WeLoreWeight)
    a, b = np.asarray(node.a, np.float64), np.asarray(node.b, np.float64)
    uw, vw = (x.double().numpy() for x in official_low_rank_layer(torch.from_numpy(w.T.copy()),
                                                                   rank))
    # Flax a = (V.weight)^T, b = (U.weight)^T, up to one sign per rank-one component
    # (individual float32 singular vectors from two SVD codes differ by ~eps ||W|| / gap: up to
    # 1.6e-5 measured here, so the factors get 5e-5; their product is checked at 1e-5)
    sign = np.sign(np.sum(a * vw.T, axis=0))
    np.testing.assert_allclose(a * sign, vw.T, atol=5e-5)
    np.testing.assert_allclose(b * sign[:, None], uw.T, atol=5e-5)
    np.testing.assert_allclose(a @ b, (uw @ vw).T, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_materialize_is_the_best_rank_r_approximation(rank):
    w = np.random.default_rng(1).standard_normal((8, 5))
    node = WeLore(rank=rank).adapt(jax.random.key(0), jnp.asarray(w, jnp.float32))
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    want = (u[:, :rank] * s[:rank]) @ vh[:rank]
    got = np.asarray(node.materialize(), np.float64)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got - w), np.linalg.norm(s[rank:]), rtol=1e-4,
                               atol=1e-5)
    # A = U_r S^1/2, B = S^1/2 V_r^T: orthogonal columns / rows with norms sqrt(s)
    a, b = np.asarray(node.a, np.float64), np.asarray(node.b, np.float64)
    np.testing.assert_allclose(a.T @ a, np.diag(s[:rank]), atol=1e-5)
    np.testing.assert_allclose(b @ b.T, np.diag(s[:rank]), atol=1e-5)
    assert node.method.num_trainable((8, 5)) == rank * 13 == a.size + b.size


def _tree():
    """Three targeted matrices with hand-picked spectra and one untargeted leaf.

    normalized: q: (8-2)/(8-2)=1, (5-2)/6=.5, (3-2)/6=1/6, 0       -> below .3: 2
                k: 1, (7-1)/9=2/3, (2-1)/9=1/9, (1.5-1)/9=1/18, 0 -> below .3: 3
                o (stacked): slice 0 (4, 4, 4): all equal -> none pruned
                             slice 1 (6, 1, 0): 1, 1/6, 0 -> below .3: 2
    """
    q = _with_spectrum([8.0, 5.0, 3.0, 2.0], 4, 6, 0)
    k = _with_spectrum([10.0, 7.0, 2.0, 1.5, 1.0], 5, 7, 1)
    o = jnp.stack([_with_spectrum([4.0, 4.0, 4.0], 3, 5, 2),
                   _with_spectrum([6.0, 1.0, 0.0], 3, 5, 3)])
    return {"att": {"q": q, "k": k}, "mlp": {"o": o}, "norm": jnp.ones(4)}


TARGETS = {r"att/.*": WeLore(), r"mlp/o": WeLore(batch_axes=0)}


def test_spectra_and_ranks_against_a_hand_computed_example():
    params = _tree()
    spec = welore_spectra(params, TARGETS)
    np.testing.assert_allclose(spec["att/q"], [[8.0, 5.0, 3.0, 2.0]], atol=1e-5)
    np.testing.assert_allclose(spec["mlp/o"], [[4.0, 4.0, 4.0], [6.0, 1.0, 0.0]], atol=1e-5)
    ranks = welore_ranks(params, TARGETS, threshold=0.3)
    assert ranks == {"att/q": (2,), "att/k": (2,), "mlp/o": (3, 1)}
    # the official rule on the same spectra (2-D leaves; the official code has no stacked ones)
    pruned = official_rank_pruning({p: spec[p][0] for p in ("att/q", "att/k")}, 0.3)
    assert pruned == {"att/q": 2, "att/k": 3}
    assert welore_ranks(params, TARGETS, threshold=0.0) == {
        "att/q": (4,), "att/k": (5,), "mlp/o": (3, 3)}
    assert welore_ranks(params, TARGETS, threshold=1.0) == {
        "att/q": (1,), "att/k": (1,), "mlp/o": (3, 1)}


def test_threshold_for_a_target_reduction_is_the_smallest_that_reaches_it():
    params = _tree()
    total = 4 + 5 + 3 + 3
    # prunable values (all but each row's max), sorted: 0, 0, 0, 1/18, 1/9, 1/6, 1/6, .5, 2/3
    # (slice 0 of o is flat: its values count as 1 and are never pruned); ties at 0 overshoot
    # (0.1 * 15 -> 2 needed, 3 pruned); 0.4 would split the two (float-noisy) 1/6 values
    for reduction, want_pruned in [(0.0, 0), (0.1, 3), (0.2, 3), (0.3, 5), (0.5, 8), (0.6, 9)]:
        t = welore_threshold(params, TARGETS, reduction)
        ranks = welore_ranks(params, TARGETS, threshold=t)
        pruned = total - sum(sum(r) for r in ranks.values())
        assert pruned == want_pruned and pruned >= reduction * total
        # minimal: any smaller threshold prunes less than the target
        below = welore_ranks(params, TARGETS, threshold=float(np.nextafter(t, -1)) if t else 0.0)
        assert t == 0.0 or total - sum(sum(r) for r in below.values()) < reduction * total
        assert welore_ranks(params, TARGETS, reduction=reduction) == ranks
    with pytest.raises(ValueError, match="leaving some matrix with rank 0"):
        welore_threshold(params, TARGETS, 0.61)  # 10 > the 9 prunable values


def test_rules_pick_the_lrcs_and_inject_compresses_only_them():
    params = _tree()
    # ratios at t = 0.3: q 2/4, k 3/5, o (0 + 2) / 6
    rules = welore_rules(params, TARGETS, threshold=0.3, min_ratio=0.45)
    assert rules == {"att/q": WeLore(rank=2), "att/k": WeLore(rank=2)}
    rules = welore_rules(params, TARGETS, threshold=0.3)  # official default min_ratio = 0
    assert rules["mlp/o"] == WeLore(rank=(3, 1), batch_axes=0)
    rules = welore_rules(params, TARGETS, threshold=0.3, min_ratio=0.55)
    assert list(rules) == ["att/k"]
    tree = jax.jit(lambda p, key: inject(p, rules, key=key))(params, jax.random.key(0))
    node = tree["att"]["k"]
    assert isinstance(node, WeLoreWeight) and node.a.shape == (5, 2) and node.b.shape == (2, 7)
    # N-LRCs and untargeted leaves: the same dense arrays, frozen
    for path in (("att", "q"), ("mlp", "o"), ("norm",)):
        x, y = tree, params
        for p in path:
            x, y = x[p], y[p]
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    trainable, _ = split(tree)
    assert [x.shape for x in jax.tree.leaves(trainable)] == [(5, 2), (2, 7)]
    # memory: the compressed leaf holds r (n_in + n_out) = 24 numbers instead of 35
    dense = sum(x.size for x in jax.tree.leaves(params))
    assert summary(tree).total == dense - 35 + 24 and summary(tree).trainable == 24
    got = np.asarray(materialize(tree)["att"]["k"], np.float64)
    w = np.asarray(params["att"]["k"], np.float64)
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    np.testing.assert_allclose(got, (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5)


def test_stacked_kernel_with_per_slice_ranks():
    w = jnp.asarray(np.random.default_rng(3).standard_normal((3, 7, 6)), jnp.float32)
    method = WeLore(rank=(4, 1, 2), batch_axes=0)
    node = method.adapt(jax.random.key(0), w)
    assert node.a.shape == (3, 7, 4) and node.b.shape == (3, 4, 6)
    assert method.num_trainable(w.shape) == 3 * 4 * (7 + 6) == node.a.size + node.b.size
    a, b = np.asarray(node.a), np.asarray(node.b)
    for k, r in enumerate((4, 1, 2)):
        np.testing.assert_array_equal(a[k, :, r:], 0.0)  # padding is exactly zero
        np.testing.assert_array_equal(b[k, r:, :], 0.0)
        u, s, vh = np.linalg.svd(np.asarray(w[k], np.float64), full_matrices=False)
        np.testing.assert_allclose(np.asarray(node.materialize()[k], np.float64),
                                   (u[:, :r] * s[:r]) @ vh[:r], atol=1e-5)
    # padded columns are masked: nonzero values there change nothing and get zero gradient
    tree = _perturb({"k": node})
    got = np.asarray(materialize(tree)["k"], np.float64)
    pa, pb = np.asarray(tree["k"].a, np.float64), np.asarray(tree["k"].b, np.float64)
    want = np.stack([pa[k, :, :r] @ pb[k, :r] for k, r in enumerate((4, 1, 2))])
    np.testing.assert_allclose(got, want, atol=1e-5)
    trainable, frozen = split(tree)
    g = jax.grad(lambda t: jnp.sum(materialize(combine(t, frozen))["k"] ** 2))(trainable)["k"]
    for k, r in enumerate((4, 1, 2)):
        np.testing.assert_array_equal(np.asarray(g.a)[k, :, r:], 0.0)
        np.testing.assert_array_equal(np.asarray(g.b)[k, r:, :], 0.0)
        assert np.abs(np.asarray(g.a)[k, :, :r]).min() > 0


def test_bfloat16_kernel():
    w = jnp.asarray(np.random.default_rng(4).standard_normal((8, 6)), jnp.bfloat16)
    node = WeLore().adapt(jax.random.key(0), w)
    assert node.a.dtype == node.b.dtype == jnp.float32 and node.dtype == jnp.bfloat16
    out = node.materialize()
    assert out.dtype == jnp.bfloat16
    # full rank: exact up to float32 SVD error and the final rounding to bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(w, np.float32),
                               rtol=2**-8, atol=1e-5)
    node16 = WeLore(rank=2, dtype=jnp.bfloat16).adapt(jax.random.key(0), w)
    assert node16.a.dtype == jnp.bfloat16


def test_bad_inputs():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        WeLore(rank=0)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        WeLore(rank=(2, 0), batch_axes=0)
    with pytest.raises(TypeError, match="rank must be None, an int or a tuple"):
        WeLore(rank=2.5)
    with pytest.raises(ValueError, match="rank tuple is empty"):
        WeLore(rank=())
    with pytest.raises(ValueError, match="has 2 entries but the kernel of shape .* 3 batch"):
        WeLore(rank=(1, 2), batch_axes=0).adapt(jax.random.key(0), jnp.ones((3, 4, 4)))
    with pytest.raises(ValueError, match=r"rank must be <= min\(n_in, n_out\) = 4"):
        WeLore(rank=5).adapt(jax.random.key(0), jnp.ones((4, 9)))
    with pytest.raises(TypeError, match="floating kernel"):
        WeLore().adapt(jax.random.key(0), jnp.ones((3, 3), jnp.int32))
    params = _tree()
    with pytest.raises(ValueError, match="exactly one of threshold= and reduction="):
        welore_ranks(params, TARGETS)
    with pytest.raises(ValueError, match="exactly one of threshold= and reduction="):
        welore_ranks(params, TARGETS, threshold=0.1, reduction=0.1)
    with pytest.raises(ValueError, match="threshold must be a number in"):
        welore_ranks(params, TARGETS, threshold=1.5)
    with pytest.raises(ValueError, match="reduction must be a number in"):
        welore_threshold(params, TARGETS, 1.0)
    with pytest.raises(ValueError, match="min_ratio must be a number in"):
        welore_rules(params, TARGETS, threshold=0.3, min_ratio=-0.1)
    with pytest.raises(ValueError, match="no targeted leaf prunes more than min_ratio=0.9"):
        welore_rules(params, TARGETS, threshold=0.3, min_ratio=0.9)
    with pytest.raises(TypeError, match="must be a WeLore template"):
        from effjax.peft import LoRA
        welore_spectra(params, {"att/q": LoRA(rank=1)})
    with pytest.raises(ValueError, match="matches no leaf"):
        welore_spectra(params, {"att/x": WeLore()})
    with pytest.raises(TypeError, match="leaf 'norm' .*is not a floating array"):
        welore_spectra({"norm": jnp.ones((2, 2), jnp.int32)}, "norm")
