"""Fused steps owned by effjax.optim: decided at trace time (building an optimizer starts no
backend), the same state pytree as the unfused step, and ``fused_apply`` letting the kernel
write the parameters also inside ``optax.chain`` / ``inject_hyperparams``, never when a
transform comes after it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from effjax import optim
from effjax.optim import _fused
from pallas_kernels import optim_update as K

PARAMS = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((4, 256)), jnp.float32),
          "b": jnp.ones((8,), jnp.float32)}
GRADS = {"w": jnp.asarray(np.random.default_rng(1).standard_normal((4, 256)), jnp.float32),
         "b": jnp.full((8,), 0.5, jnp.float32)}


def test_building_optimizers_starts_no_backend():
    code = textwrap.dedent("""
        import optax
        from jax._src import xla_bridge
        from effjax import optim
        opts = [optim.adamw_8bit(1e-3), optim.adam_8bit(1e-3), optim.lion_8bit(1e-4),
                optim.sgd_8bit(1e-2), optim.adamw_4bit(1e-3), optim.scale_by_adam_8bit(),
                optim.adamw_8bit(1e-3, use_kernel=True), optim.rmsprop_8bit(1e-3),
                optim.stable_spam(1e-3, state_bits=8), optim.galore_adamw(1e-3, rank=4),
                optim.fused_apply(optim.adamw_8bit(1e-3))]
        assert not xla_bridge.backends_are_initialized(), "a backend was started"
        import jax
        jax.devices()
        assert xla_bridge.backends_are_initialized()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("fused,reference", [
    (lambda: optim.adamw_8bit(1e-2, weight_decay=0.1, min_quantized_size=1024, use_kernel=True),
     lambda: optim.quantize_state(optax.adamw(1e-2, weight_decay=0.1), min_quantized_size=1024)),
    (lambda: optim.lion_8bit(1e-3, min_quantized_size=1024, use_kernel=True),
     lambda: optim.quantize_state(optax.lion(1e-3, weight_decay=1e-3), min_quantized_size=1024)),
    (lambda: optim.sgd_8bit(1e-2, min_quantized_size=1024, use_kernel=True),
     lambda: optim.quantize_state(optax.sgd(1e-2, momentum=0.9), min_quantized_size=1024)),
    (lambda: optim.adam_4bit(1e-2, min_quantized_size=1024, use_kernel=True),
     lambda: optim.quantize_state(optax.adam(1e-2), bits=4, min_quantized_size=1024)),
])
def test_fused_state_is_quantize_state_of_the_optax_alias(fused, reference):
    """A checkpoint of the fused step is one of ``quantize_state(optax.<alias>)`` (and back)."""
    got, want = fused().init(PARAMS), reference().init(PARAMS)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _Spy:
    """Records the ``apply`` flag of every fused kernel call (the kernel still runs)."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = K.fused_update

        def spy(*args, apply=False, **kw):
            self.calls.append(apply)
            return original(*args, apply=apply, **kw)

        monkeypatch.setattr(K, "fused_update", spy)


def _opt():
    return optim.adamw_8bit(1e-2, weight_decay=0.1, min_quantized_size=1024, use_kernel=True)


@pytest.mark.parametrize("where", ["alone", "last_in_chain", "inject_hyperparams"])
def test_fused_apply_writes_params_in_the_kernel(monkeypatch, where):
    opt = {"alone": _opt,
           "last_in_chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), _opt()),
           "inject_hyperparams": lambda: optax.inject_hyperparams(
               lambda learning_rate: optim.adamw_8bit(learning_rate, weight_decay=0.1,
                                                      min_quantized_size=1024,
                                                      use_kernel=True))(learning_rate=1e-2),
           }[where]()
    state = opt.init(PARAMS)
    u, s_ref = opt.update(GRADS, state, PARAMS)
    p_ref = optax.apply_updates(PARAMS, u)
    spy = _Spy(monkeypatch)
    p_new, s_new = optim.fused_apply(opt)(GRADS, state, PARAMS)
    assert spy.calls == [True]  # one quantized leaf ("w"), written by the kernel
    for a, b in zip(jax.tree.leaves((p_new, s_new)), jax.tree.leaves((p_ref, s_ref))):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=0, atol=2e-6)
    assert float(jnp.max(jnp.abs(p_new["w"] - PARAMS["w"]))) > 1e-3


def test_a_transform_after_the_fused_one_gets_the_update(monkeypatch):
    opt = optax.chain(_opt(), optax.scale(0.5))  # halves the update: params must see it
    state = opt.init(PARAMS)
    u, _ = opt.update(GRADS, state, PARAMS)
    p_ref = optax.apply_updates(PARAMS, u)
    spy = _Spy(monkeypatch)
    p_new, _ = optim.fused_apply(opt)(GRADS, state, PARAMS)
    assert spy.calls == [True]  # asked to write, but the written params were not used
    # "w" got the unfused reference's update (the kernel's own can differ from it by an ulp
    # of float32 for Adam: XLA contracts multiply-adds differently, see pallas_kernels)
    np.testing.assert_allclose(np.asarray(p_new["w"]), np.asarray(p_ref["w"]), rtol=0,
                               atol=1e-6)
    np.testing.assert_array_equal(np.asarray(p_new["b"]), np.asarray(p_ref["b"]))
    # the halved step, not the kernel's full one
    full = optax.apply_updates(PARAMS, _opt().update(GRADS, _opt().init(PARAMS), PARAMS)[0])
    np.testing.assert_allclose(np.asarray(p_new["w"] - PARAMS["w"]),
                               0.5 * np.asarray(full["w"] - PARAMS["w"]), rtol=1e-5, atol=1e-7)


def test_fused_apply_under_jit_and_without_params():
    opt = _opt()
    state = opt.init(PARAMS)
    p_jit, _ = jax.jit(optim.fused_apply(opt))(GRADS, state, PARAMS)
    p_eager, _ = optim.fused_apply(opt)(GRADS, state, PARAMS)
    np.testing.assert_array_equal(np.asarray(p_jit["w"]), np.asarray(p_eager["w"]))
    with pytest.raises(ValueError, match="needs the parameters"):
        optim.fused_apply(opt)(GRADS, state, None)


def test_update_outside_fused_apply_never_writes(monkeypatch):
    opt = _opt()
    spy = _Spy(monkeypatch)
    opt.update(GRADS, opt.init(PARAMS), PARAMS)
    assert spy.calls == [False]


def test_no_module_level_registry():
    """fused_apply must not find kernels through a global table keyed by functions."""
    import types
    tables = [n for n, v in vars(_fused).items()
              if isinstance(v, dict) and not n.startswith("__") and n != "_FIELDS"]
    assert tables == []
    assert not any(isinstance(v, types.MappingProxyType) for v in vars(_fused).values())


def test_use_kernel_is_checked_when_built():
    with pytest.raises(ValueError, match="use_kernel must be None, True or False"):
        optim.adamw_8bit(1e-3, use_kernel="yes")
    with pytest.raises(ValueError, match="no fused Pallas kernel"):
        optim.rmsprop_8bit(1e-3, use_kernel=True)
