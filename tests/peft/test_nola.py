"""NOLA: conformance checks, the equation written in numpy, seeded bases, checkpoints.

Tolerances (float32 vs a float64 numpy reference): 1e-5 relative/absolute.
"""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from effjax.peft import (
    combine,
    inject,
    load_adapters,
    materialize,
    merge,
    save_adapters,
    split,
    summary,
    trainable_mask,
)
from effjax.peft.nola import NOLA, NOLAWeight, nola_bases
from effjax.selection import path_str
from tests.peft.conformance_case import params_for as _params
from tests.peft.conformance_case import paths as _paths
from tests.peft.conformance_case import perturb as _perturb

# name: (method, kernel shape, trainable count by hand)
CASES = {
    "2d": (NOLA(rank=3, num_basis_a=5, num_basis_b=7, alpha=6.0), (12, 10), 5 + 7),
    "qkv": (NOLA(rank=2, num_basis_a=4, num_basis_b=3, seed=5), (16, 4, 8), 4 + 3),
    "stacked": (NOLA(rank=2, num_basis_a=4, num_basis_b=6, batch_axes=0), (3, 12, 10),
                3 * (4 + 6)),
    "experts_mid": (NOLA(rank=2, num_basis_a=3, num_basis_b=2, batch_axes=1), (6, 3, 5),
                    3 * (3 + 2)),
}
NAMES = list(CASES)
FIELDS = {"layer/kernel/coef_a", "layer/kernel/coef_b"}


def _inject(name, dtype=jnp.float32):
    method, shape, _ = CASES[name]
    params = _params(shape, dtype)
    return params, inject(params, {r"layer/kernel": method}, key=jax.random.key(1))


def numpy_kernel(name, node):
    """W + s (A0 + sum_i alpha_i A_i)(sum_j beta_j B_j) per slice, in float64 numpy loops."""
    m = node.method
    lay = node.layout
    f = lambda x: np.asarray(x, np.float64)
    a0, a_bases, b_bases = (f(x) for x in nola_bases(m.seed, m.rank, m.num_basis_a,
                                                     m.num_basis_b, lay.n_in, lay.n_out))
    w = f(lay.to_matrix(node.w)).reshape(-1, lay.n_in, lay.n_out)
    ca = f(node.coef_a).reshape(-1, m.num_basis_a)
    cb = f(node.coef_b).reshape(-1, m.num_basis_b)
    out = []
    for s in range(w.shape[0]):
        a = a0 + sum(ca[s, i] * a_bases[i] for i in range(m.num_basis_a))
        b = sum(cb[s, j] * b_bases[j] for j in range(m.num_basis_b))
        out.append(w[s] + (m.alpha / m.rank) * a @ b)
    mat = np.stack(out).reshape(lay.batch_shape + (lay.n_in, lay.n_out))
    return _unmat(lay, mat)


def _unmat(lay, mat):
    """numpy version of KernelLayout.from_matrix (float64)."""
    m = mat.reshape(lay.batch_shape + lay.in_shape + lay.out_shape)
    perm = lay.batch_axes + lay.in_axes + lay.out_axes
    return m.transpose(np.argsort(perm))


@pytest.mark.parametrize("name", NAMES)
def test_count_identity_numpy_reference_and_jit(name):
    method, shape, expected = CASES[name]
    params, tree = _inject(name)
    trainable, _ = split(tree)
    assert method.num_trainable(shape) == expected == summary(tree).trainable == sum(
        x.size for x in jax.tree.leaves(trainable))
    assert _paths(trainable) == FIELDS
    for x, y in zip(jax.tree.leaves(materialize(tree)), jax.tree.leaves(params)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(tree["layer"]["kernel"].coef_b), 0.0)

    tree = _perturb(tree)
    want = numpy_kernel(name, tree["layer"]["kernel"])
    got = materialize(tree)["layer"]["kernel"]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    if name in ("2d", "stacked"):  # each jit of the bases costs a threefry compile
        jitted = jax.jit(materialize)(tree)["layer"]["kernel"]
        np.testing.assert_allclose(np.asarray(jitted), np.asarray(got), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(merge(tree)["layer"]["kernel"]), np.asarray(got))


@pytest.mark.parametrize("name", ["2d", "stacked"])
def test_grad_reaches_only_trainable_leaves(name):
    _, tree = _inject(name)
    tree = _perturb(tree)
    shape = CASES[name][1]
    c = jnp.asarray(np.random.default_rng(3).standard_normal(shape), jnp.float32)
    trainable, frozen = split(tree)

    def loss(t):
        return jnp.sum(c * materialize(combine(t, frozen))["layer"]["kernel"] ** 2)

    grads = jax.jit(jax.grad(loss))(trainable)
    mask = trainable_mask(tree)
    want = {path_str(p) for p, m in jax.tree_util.tree_flatten_with_path(mask)[0] if m}
    assert _paths(grads) == want == FIELDS
    # d loss / d coef = <dL/dW', dW'/dcoef>: check by central differences in float64 numpy
    node = tree["layer"]["kernel"]
    cn = np.asarray(c, np.float64)
    for field in ("coef_a", "coef_b"):
        g = np.asarray(getattr(grads["layer"]["kernel"], field))
        base = np.asarray(getattr(node, field), np.float64)
        num = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            e = np.zeros_like(base)
            e[idx] = 1e-3
            plus = numpy_kernel(name, node.replace(**{field: base + e}))
            minus = numpy_kernel(name, node.replace(**{field: base - e}))
            num[idx] = (np.sum(cn * plus**2) - np.sum(cn * minus**2)) / 2e-3
        assert np.abs(g).max() > 0
        np.testing.assert_allclose(g, num, rtol=1e-3, atol=1e-3)


def test_init_gradient_reaches_beta_through_a0():
    """At init (alpha = beta = 0) only beta gets a gradient: A = A0 != 0, B = 0."""
    _, tree = _inject("2d")
    trainable, frozen = split(tree)
    c = jnp.asarray(np.random.default_rng(4).standard_normal((12, 10)), jnp.float32)
    grads = jax.grad(lambda t: jnp.sum(c * materialize(combine(t, frozen))["layer"]["kernel"]))(
        trainable)["layer"]["kernel"]
    np.testing.assert_array_equal(np.asarray(grads.coef_a), 0.0)
    assert float(jnp.abs(grads.coef_b).min()) > 0


@pytest.mark.parametrize("name", ["2d", "stacked"])
def test_checkpoint_holds_only_coefficients_and_load_reproduces_exactly(name, tmp_path):
    method, shape, expected = CASES[name]
    params, tree = _inject(name)
    tree = _perturb(tree)
    save_adapters(tmp_path / "ad", tree)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        raw = ck.restore(tmp_path / "ad", args=ocp.args.Composite(
            adapters=ocp.args.StandardRestore()))["adapters"]
    assert _paths(raw) == FIELDS
    assert sum(np.asarray(x).size for x in jax.tree.leaves(raw)) == expected
    want = np.asarray(materialize(tree)["layer"]["kernel"])
    for rules, key in ((None, None), ({r"layer/kernel": method}, jax.random.key(77))):
        back = load_adapters(tmp_path / "ad", params, rules, key=key)
        for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        np.testing.assert_array_equal(np.asarray(materialize(back)["layer"]["kernel"]), want)


def test_bases_are_seeded_and_distributed_as_the_official_code():
    same = [nola_bases(3, 4, 8, 6, 32, 16) for _ in range(2)]
    for x, y in zip(*same):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    other = nola_bases(4, 4, 8, 6, 32, 16)
    for x, y in zip(same[0], other):
        assert not np.array_equal(np.asarray(x), np.asarray(y))
    a0, a, b = (np.asarray(x) for x in nola_bases(0, 8, 64, 32, 64, 48))
    # A0 ~ U(+-1/sqrt(n_in)); A_i ~ U(-1, 1)/sqrt(k); B_j ~ U(-1, 1)/sqrt(l)
    for x, bound in ((a0, 1 / 8), (a, 1 / 8), (b, 1 / np.sqrt(32))):
        assert np.abs(x).max() <= bound and np.abs(x).max() > 0.98 * bound
        assert x.std() == pytest.approx(bound / np.sqrt(3), rel=0.05)
        assert abs(x.mean()) < 0.05 * bound
    # two leaves of equal shape share bases; the node stores none of them
    tree = inject({"p": jnp.ones((6, 5)), "q": jnp.zeros((6, 5))},
                  {".*": NOLA(rank=2, num_basis_a=3, num_basis_b=3)}, key=jax.random.key(0))
    assert [x.shape for x in jax.tree.leaves(split(tree)[1])] == [(6, 5), (6, 5)]
    fa = [tree[k].factors()[0] for k in "pq"]
    np.testing.assert_array_equal(np.asarray(fa[0]), np.asarray(fa[1]))


def test_bfloat16_params_and_errors():
    params, tree = _inject("2d", jnp.bfloat16)
    node = tree["layer"]["kernel"]
    assert isinstance(node, NOLAWeight) and node.coef_a.dtype == jnp.float32
    out = materialize(tree)["layer"]["kernel"]
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(params["layer"]["kernel"], np.float32))
    tree = _perturb(tree)
    want = numpy_kernel("2d", tree["layer"]["kernel"])
    np.testing.assert_allclose(np.asarray(materialize(tree)["layer"]["kernel"], np.float32),
                               want, rtol=2**-7, atol=1e-6)
    with pytest.raises(ValueError, match="num_basis_a"):
        NOLA(num_basis_a=0)
    with pytest.raises(TypeError, match="alpha"):
        NOLA(alpha="1")
    with pytest.raises(TypeError, match="floating"):
        NOLA(rank=1).adapt(jax.random.key(0), jnp.ones((3, 2), jnp.int32))
