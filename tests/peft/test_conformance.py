"""Conformance table for effjax.peft adapter methods.

Every row of every ``tests/peft/cases_*.py`` (one row per method and kernel layout; see
:mod:`tests.peft.conformance_case`) passes the same checks: the trainable-count formula;
``materialize`` right after ``inject`` equals the base where the method promises it; the
equation written plainly, under jit, and as ``merge``'s exported params (plain arrays of the
original shapes and dtypes); gradients that reach only trainable leaves (and equal those of the
plain equation); split/combine; the orbax round trip holding only trainable leaves; 8-device
sharding; bfloat16 params (float32 adapters); bad kernels and shared config fields checked by
the base classes.

Tolerances (float32): plain equation 1e-5, jit vs eager 1e-6, gradients 1e-4 (relative and
absolute; different summation orders of the same float32 products).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import effjax.peft
from effjax.peft import (
    KernelAdapter,
    LoRA,
    combine,
    inject,
    load_adapters,
    materialize,
    merge,
    registered_adapters,
    save_adapters,
    split,
    summary,
    trainable_mask,
)
from effjax.selection import path_str
from tests.peft.conformance_case import collect_cases, params_for
from tests.peft.conformance_case import paths as _paths
from tests.peft.conformance_case import perturb as _perturb

CASES = collect_cases()
NAMES = list(CASES)
RULE = r"layer/kernel"


def _calibration(name, params):
    case = CASES[name]
    return None if case.calibration is None else case.calibration(params)


def _inject(name, dtype=jnp.float32, key=1):
    case = CASES[name]
    params = params_for(case.shape, dtype)
    return params, inject(params, {RULE: case.method}, key=jax.random.key(key),
                          calibration=_calibration(name, params))


def test_every_registered_method_has_rows():
    exported = {c for c in registered_adapters().values()
                if getattr(effjax.peft, c.__name__, None) is c}
    assert len(exported) == 16
    assert {type(c.method) for c in CASES.values()} == exported


@pytest.mark.parametrize("name", NAMES)
def test_trainable_count_formula(name):
    case = CASES[name]
    _, tree = _inject(name)
    trainable, _ = split(tree)
    n_leaves = sum(x.size for x in jax.tree.leaves(trainable))
    assert case.method.num_trainable(case.shape) == case.trainable == n_leaves
    assert summary(tree).trainable == n_leaves
    assert summary(tree).total == sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", NAMES)
def test_materialize_after_inject_is_the_base(name):
    case = CASES[name]
    params, tree = _inject(name)
    out = materialize(tree)
    assert jax.tree.structure(out) == jax.tree.structure(params)
    for path, x, y in zip(sorted(_paths(out)), jax.tree.leaves(out), jax.tree.leaves(params)):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        if case.identity == "exact" or not path.startswith(RULE):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        elif case.identity == "close":
            tol = case.identity_tol * float(jnp.abs(y).max())
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=tol)
        else:
            assert case.why, f"{name}: identity='none' needs a reason in `why`"


@pytest.mark.parametrize("name", NAMES)
def test_materialize_matches_the_plain_equation_and_jit(name):
    case = CASES[name]
    _, tree = _inject(name)
    tree = _perturb(tree)
    node = tree["layer"]["kernel"]
    want = jax.jit(case.reference)(node)
    got = materialize(tree)["layer"]["kernel"]
    assert got.shape == case.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    jitted = jax.jit(materialize)(tree)["layer"]["kernel"]
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(got), rtol=1e-6, atol=1e-6)
    # merge (export): the base's own structure, plain arrays of the original shapes and dtypes
    params = params_for(case.shape)
    merged = merge(tree)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(params)):
        assert type(x) is type(y) and x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_allclose(np.asarray(merged["layer"]["kernel"]), np.asarray(want),
                               rtol=1e-5, atol=1e-5)
    # inject itself under jit gives the same tree (rules closed over, key traced)
    calib = _calibration(name, params)
    eager = inject(params, {RULE: case.method}, key=jax.random.key(5), calibration=calib)
    traced = jax.jit(lambda p, k: inject(p, {RULE: case.method}, key=k, calibration=calib))(
        params, jax.random.key(5))
    assert jax.tree.structure(traced) == jax.tree.structure(eager)
    for x, y in zip(jax.tree.leaves(traced), jax.tree.leaves(eager)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_grad_reaches_only_trainable_leaves_and_matches_the_equation(name):
    case = CASES[name]
    _, tree = _inject(name)
    tree = _perturb(tree)
    c = jnp.asarray(np.random.default_rng(3).standard_normal(case.shape), jnp.float32)
    trainable, frozen = split(tree)

    def loss(t):
        p = materialize(combine(t, frozen))
        return jnp.sum(c * p["layer"]["kernel"] ** 2) + jnp.sum(p["layer"]["bias"])

    grads = jax.jit(jax.grad(loss))(trainable)
    node = tree["layer"]["kernel"]
    fields = node.trainable_fields
    mask = trainable_mask(tree)
    want_paths = {path_str(p) for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]
                  if m}
    assert _paths(grads) == _paths(trainable) == want_paths
    assert want_paths == {f"layer/kernel/{f}" for f in fields} and fields

    def ref_loss(*vals):
        return jnp.sum(c * case.reference(node.replace(**dict(zip(fields, vals)))) ** 2)

    ref = jax.jit(jax.grad(ref_loss, argnums=tuple(range(len(fields)))))(
        *[getattr(node, f) for f in fields])
    for f, r in zip(fields, ref):
        g = getattr(grads["layer"]["kernel"], f)
        assert float(jnp.abs(g).max()) > 0, f
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_split_combine_is_an_exact_inverse(name):
    _, tree = _inject(name)
    trainable, frozen = split(tree)
    back = combine(trainable, frozen)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    assert all(x is y for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tree)))
    assert not set(_paths(trainable)) & set(_paths(frozen))
    assert _paths(trainable) | _paths(frozen) == _paths(tree)


@pytest.mark.parametrize("name", NAMES)
def test_save_load_roundtrip_stores_only_trainable_leaves(name, tmp_path):
    case = CASES[name]
    params, tree = _inject(name)
    tree = _perturb(tree)
    save_adapters(tmp_path / "ad", tree)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:  # raw read, no target
        raw = ck.restore(tmp_path / "ad", args=ocp.args.Composite(
            adapters=ocp.args.StandardRestore()))["adapters"]
    trainable, _ = split(tree)
    assert _paths(raw) == _paths(trainable)
    assert sum(np.asarray(x).size for x in jax.tree.leaves(raw)) == case.trainable
    calib = _calibration(name, params)
    for rules in (None, {RULE: case.method}):
        back = load_adapters(tmp_path / "ad", params, rules, key=jax.random.key(1),
                             calibration=calib)
        assert jax.tree.structure(back) == jax.tree.structure(tree)
        for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _spec(shape):
    """Shard axis 0 over 'x' and the last axis over 'y' where they divide."""
    return PartitionSpec("x" if shape[0] % 2 == 0 else None,
                         *([None] * (len(shape) - 2)), "y" if shape[-1] % 4 == 0 else None)


@pytest.mark.parametrize("name", NAMES)
def test_sharded_kernel_on_8_devices(name):
    case = CASES[name]
    if not case.sharded:
        assert case.why, f"{name}: sharded=False needs a reason in `why`"
        return
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("x", "y"))
    params = params_for(case.shape)
    spec = _spec(case.shape)
    sharded = dict(params, layer=dict(params["layer"], kernel=jax.device_put(
        params["layer"]["kernel"], NamedSharding(mesh, spec))))
    calib = _calibration(name, params)
    tree = _perturb(inject(sharded, {RULE: case.method}, key=jax.random.key(1),
                           calibration=calib))
    host = _perturb(inject(params, {RULE: case.method}, key=jax.random.key(1),
                           calibration=calib))
    out = jax.jit(materialize)(tree)["layer"]["kernel"]
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, spec), len(case.shape))
    np.testing.assert_allclose(np.asarray(out),
                               np.asarray(materialize(host)["layer"]["kernel"]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_params(name):
    case = CASES[name]
    params, tree = _inject(name, jnp.bfloat16)
    node = tree["layer"]["kernel"]
    if isinstance(case.method, KernelAdapter) and case.method.dtype is None:
        # PEFT's autocast_adapter_dtype: float32 adapters on a 16-bit kernel, w kept bfloat16
        for f in node.trainable_fields + node.frozen_fields:
            x = getattr(node, f)
            want_dtype = jnp.bfloat16 if f == "w" else jnp.float32
            assert x.dtype == want_dtype or not jnp.issubdtype(x.dtype, jnp.floating), (f, x)
    out = materialize(tree)
    assert out["layer"]["kernel"].dtype == jnp.bfloat16
    base = np.asarray(params["layer"]["kernel"], np.float32)
    got0 = np.asarray(out["layer"]["kernel"], np.float32)
    if case.identity == "exact":
        np.testing.assert_array_equal(got0, base)
    elif case.identity == "close":  # the residual is rounded to bfloat16
        np.testing.assert_allclose(got0, base, rtol=0, atol=2**-7 * np.abs(base).max())
    tree = _perturb(tree)
    node = tree["layer"]["kernel"]
    want = np.asarray(case.reference(node).astype(jnp.bfloat16), np.float32)
    got = materialize(tree)["layer"]["kernel"]
    assert got.dtype == jnp.bfloat16
    # both round a float32 value to bfloat16: equal up to one bf16 ulp of reassociation
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=case.bf16_rtol,
                               atol=1e-6)
    assert merge(tree)["layer"]["kernel"].dtype == jnp.bfloat16


@pytest.mark.parametrize("name", NAMES)
def test_base_checks_the_kernel_and_the_shared_fields(name):
    method = CASES[name].method
    with pytest.raises(TypeError, match=f"{method.name} needs a floating kernel, got dtype int32"):
        method.adapt(jax.random.key(0), jnp.ones(CASES[name].shape, jnp.int32))
    if isinstance(method, KernelAdapter):  # normalized by KernelAdapter.__post_init__
        m = dataclasses.replace(method, dtype="float32", out_axes=-1)
        assert type(m.dtype) is type(jnp.dtype(jnp.float32)) and m.dtype == jnp.float32
        assert m.out_axes == (-1,)
        with pytest.raises(TypeError, match=f"{method.name} dtype must be a floating dtype"):
            dataclasses.replace(method, dtype=jnp.int32)
        with pytest.raises(TypeError, match="in_axes must be None, an int or a tuple of ints"):
            dataclasses.replace(method, in_axes=1.5)


def test_checkpoint_is_small_for_a_large_kernel(tmp_path):
    w = jnp.ones((512, 512))
    tree = inject({"k": w}, {"k": LoRA(rank=2)}, key=jax.random.key(0))
    save_adapters(tmp_path / "ad", tree)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / "ad")
               for f in fs)
    assert size < w.nbytes / 20  # 1 MiB kernel; adapters are 2 * 2 * 512 floats = 8 KiB
