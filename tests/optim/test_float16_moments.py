"""float16 parameters keep float32 moments in stable_spam and GaLore/Fira's Adam (issue 19,
found by experiments/fuzz_api.py): in float16, ``(1 - b2) g^2`` underflows for ``|g| < 0.008``
(below 6e-8) and the step ``m / (sqrt(v) + eps)`` then moved an element by 0.14-1.8 at lr 1e-3.
With float32 moments the float16 run follows the float32 run: the same steps up to float16's
rounding of the gradient and of the update (checked against the float32 run of the same
optimizer, an independent program in another dtype)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import effjax.optim as eo

MAKERS = {
    "stable_spam": lambda: eo.stable_spam(1e-3),
    "stable_spam(state_bits=8)": lambda: eo.stable_spam(1e-3, state_bits=8),
    "galore_adamw": lambda: eo.galore_adamw(1e-3, rank=4),
    "fira_adamw": lambda: eo.fira_adamw(1e-3, rank=4),
}


def _run(opt, dtype):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(32, 64)), dtype),
              "b": jnp.asarray(rng.normal(size=(128,)), dtype)}
    state = opt.init(params)
    step = jax.jit(opt.update)
    moves = []
    for _ in range(3):  # gradients of ~0.003: their squares are subnormal in float16
        g = {k: jnp.asarray(0.003 * rng.normal(size=p.shape), dtype) for k, p in params.items()}
        u, state = step(g, state, params)
        params = optax.apply_updates(params, u)
        moves.append({k: np.asarray(v, np.float32) for k, v in u.items()})
    return moves, state


@pytest.mark.parametrize("name", list(MAKERS))
def test_float16_params_take_float32_steps(name):
    opt = MAKERS[name]()
    half, state = _run(opt, jnp.float16)
    full, _ = _run(opt, jnp.float32)
    floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)
              and x.ndim and x.dtype != jnp.float16]
    assert floats  # the moments are float32 (projectors keep the parameter's dtype)
    for h, f in zip(half, full, strict=True):
        for k in h:
            # no larger than the float32 run's steps (before: 140-1800x lr)
            assert np.abs(h[k]).max() <= 1.1 * np.abs(f[k]).max(), (k, np.abs(h[k]).max())
            # float16 rounds the gradient (2**-11 relative) and the update
            np.testing.assert_allclose(h[k], f[k], rtol=0, atol=0.05 * np.abs(f[k]).max())
