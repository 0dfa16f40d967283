"""NOLA beyond the shared conformance table (``tests/peft/cases_nola.py``): where training
starts (the gradient at init), checkpoints that rebuild the bases whatever the key, the bases'
seeding and distribution (as the official code), and errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from effjax.peft import combine, inject, load_adapters, materialize, save_adapters, split
from effjax.peft.nola import NOLA, nola_bases
from tests.peft.cases_nola import CASES as TABLE
from tests.peft.conformance_case import params_for as _params
from tests.peft.conformance_case import perturb as _perturb


def _inject(name):
    params = _params(TABLE[name].shape)
    return params, inject(params, {r"layer/kernel": TABLE[name].method}, key=jax.random.key(1))


def test_init_gradient_reaches_beta_through_a0():
    """At init (alpha = beta = 0) only beta gets a gradient: A = A0 != 0, B = 0."""
    _, tree = _inject("nola_2d")
    trainable, frozen = split(tree)
    c = jnp.asarray(np.random.default_rng(4).standard_normal((12, 10)), jnp.float32)
    grads = jax.grad(lambda t: jnp.sum(c * materialize(combine(t, frozen))["layer"]["kernel"]))(
        trainable)["layer"]["kernel"]
    np.testing.assert_array_equal(np.asarray(grads.coef_a), 0.0)
    assert float(jnp.abs(grads.coef_b).min()) > 0


@pytest.mark.parametrize("name", ["nola_2d", "nola_stacked"])
def test_load_rebuilds_the_bases_whatever_the_key(name, tmp_path):
    params, tree = _inject(name)
    tree = _perturb(tree)
    save_adapters(tmp_path / "ad", tree)
    want = np.asarray(materialize(tree)["layer"]["kernel"])
    for key in (None, jax.random.key(77)):  # the bases come from the config's seed
        back = load_adapters(tmp_path / "ad", params, key=key)
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


def test_errors():
    with pytest.raises(ValueError, match="num_basis_a"):
        NOLA(num_basis_a=0)
    with pytest.raises(TypeError, match="NOLA alpha must be a number"):
        NOLA(alpha="1")
    with pytest.raises(ValueError, match="NOLA seed must be < 2"):
        NOLA(seed=2**32)
