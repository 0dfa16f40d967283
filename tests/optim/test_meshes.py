"""Every optimizer of effjax.optim on 4 x 2 meshes with Auto and with Explicit axes, under
``jax.set_mesh`` (issue 19 items 2 and 4).

One tree holds a ``(16, 64)`` leaf sharded along ``y`` (its ``(16, 32)`` shards hold whole
blocks of 32: the flat layout stays), and odd shapes whose shards do not hold whole flat blocks
(the shard-local layout): ``(8, 48)`` along both axes (rows of 48 grouped in pairs into whole
blocks, like a 384-wide leaf with blocks of 256) and ``(40, 40)`` along ``x`` (groups of 4
rows, 10 rows a shard). (The conformance table checks ``(16, 64)`` along both axes.)

For each row of the conformance table and each kind of mesh: eager ``init`` gives state
sharded like the parameters (and the layout expected of each leaf), the jitted step compiles
without collectives (where the table says the algorithm needs none), keeps that sharding, and
computes the numbers of the same step run on one device from the same state.

Needs ``quantize_state`` to requantize with ``quantize_blockwise(new, like=old)`` (the layout
is static: under jit with Auto axes the new state carries no sharding to choose it from).
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from effjax.quant import QuantizedArray
from tests.optim.test_optim_conformance import _COLLECTIVES, ROWS, _assert_trees_equal

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
_isq = lambda x: isinstance(x, QuantizedArray)

SPECS = {"w": P(None, "y"), "wide": P("x", "y"), "odd": P("x")}
SHAPES = {"w": (16, 64), "wide": (8, 48), "odd": (40, 40)}
# The layout quantize_blockwise picks (blocks of 32): flat where shards hold whole blocks, the
# shard-local layout (shards per axis) where they do not.
LAYOUT = {"w": None, "wide": (4, 2), "odd": (4, 1)}


def _matrix(shape, rng):
    """Singular values 8, 4, 2, ... (GaLore's SVD is well posed on every program)."""
    m, n = shape
    k = min(m, n)
    u, _ = np.linalg.qr(rng.normal(size=(m, k)))
    v, _ = np.linalg.qr(rng.normal(size=(n, k)))
    return (u * 8.0 * 2.0 ** -np.arange(k)) @ v.T


_rng = np.random.default_rng(19)
PARAMS = {k: np.asarray(0.5 * _rng.normal(size=s), np.float32) for k, s in SHAPES.items()}
GRADS = {k: np.asarray(_matrix(s, _rng), np.float32) for k, s in SHAPES.items()}


@functools.cache
def _mesh(kind):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 CPU devices"
    axis = AxisType.Auto if kind == "auto" else AxisType.Explicit
    return jax.make_mesh((4, 2), ("x", "y"), axis_types=(axis,) * 2)


def _put(tree, mesh):
    return {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in tree.items()}


def _on_one_device(tree):
    return jax.device_put(jax.device_get(tree), jax.devices()[0])


def _pieces(x) -> int:
    """Into how many distinct pieces ``x``'s sharding cuts it."""
    return math.prod(x.shape) // math.prod(x.sharding.shard_shape(x.shape))


def _param_of(path, shapes=SHAPES):
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return keys[-1] if keys and keys[-1] in shapes else None


def _assert_sharded_like_params(state, params, what):
    """Codes exactly like the parameter and scales cut into as many pieces (over the same mesh
    axes); float leaves the parameter's mesh axis on each axis of its length (low-rank
    projectors and moments); 0-d leaves replicated."""
    for path, x in jax.tree_util.tree_flatten_with_path(state, is_leaf=_isq)[0]:
        where = (what, jax.tree_util.keystr(path))
        key = _param_of(path)
        if _isq(x):
            p = params[key]
            assert x.codes.sharding.is_equivalent_to(p.sharding, p.ndim), (where, x.codes.sharding)
            assert _pieces(x.absmax) == _pieces(p), (where, x.absmax.sharding)
            continue
        if x.ndim == 0 or key is None:
            assert x.sharding.is_fully_replicated, (where, x.sharding)
            continue
        spec = tuple(SPECS[key]) + (None,) * (len(SHAPES[key]) - len(SPECS[key]))
        want = P(*(a if i < len(SHAPES[key]) and n == SHAPES[key][i] else None
                   for i, (a, n) in enumerate(zip(spec, x.shape))))
        assert x.sharding.is_equivalent_to(NamedSharding(params[key].sharding.mesh, want),
                                           x.ndim), (where, x.sharding, want)


# One program per mesh kind and group of rows: the compile dominates this file's time, and one
# program for all rows costs much less than one per row. Rows whose algorithm needs collectives
# (row.collectives) get their own program, so that the other group's HLO can be checked.
_QUIET = tuple(n for n in ROWS if ROWS[n].collectives is None)
_LOUD = tuple(n for n in ROWS if ROWS[n].collectives is not None)


@functools.cache
def _opt(name):
    row = ROWS[name]
    return row.factory(row.lr, **row.kwargs)


def _step(names):
    def step(grads, states, params):
        return {n: _opt(n).update(grads, states[n], params) for n in names}
    return step


@functools.cache
def _run(kind):
    """Per row: ``(params, init state, updates, new state, collectives in its group's HLO)``, or
    the exception its init or step raised."""
    mesh = _mesh(kind)
    out = {}
    with jax.set_mesh(mesh):
        params, grads = _put(PARAMS, mesh), _put(GRADS, mesh)
        states = {}
        for n in ROWS:
            try:
                states[n] = _opt(n).init(params)  # eager, as users call it
                jax.eval_shape(_opt(n).update, grads, states[n], params)
            except Exception as e:  # noqa: BLE001 - re-raised by the row's test
                out[n] = e
                states.pop(n, None)
        for group in (_QUIET, _LOUD):
            names = tuple(n for n in group if n in states)
            sub = {n: states[n] for n in names}
            compiled = jit(_step(names)).lower(grads, sub, params).compile()
            found = [c for c in _COLLECTIVES if c in compiled.as_text()]
            results = compiled(grads, sub, params)
            for n in names:
                out[n] = (params, states[n], *results[n], found)
    return out


@functools.cache
def _one_device():
    """The same step on one device from the Auto mesh's init states (the layout is static: it
    is kept)."""
    run = _run("auto")
    names = tuple(n for n in ROWS if not isinstance(run[n], Exception))
    states = {n: run[n][1] for n in names}
    return jit(_step(names))(*_on_one_device((GRADS, states, PARAMS)))


@pytest.mark.parametrize("kind", ["auto", "explicit"])
@pytest.mark.parametrize("name", list(ROWS))
def test_sharded_step(name, kind):
    row = ROWS[name]
    got = _run(kind)[name]
    if isinstance(got, Exception):
        raise got
    params, state, updates, new_state, found = got
    _assert_sharded_like_params(state, params, "init")
    quantized = {_param_of(p): q for p, q in
                 jax.tree_util.tree_flatten_with_path(state, is_leaf=_isq)[0] if _isq(q)}
    if row.quantized:
        assert {k: q.shards for k, q in quantized.items()} == LAYOUT
    if row.collectives is None:
        assert not found, found
    _assert_sharded_like_params(new_state, params, "after a step")
    for k in SHAPES:
        assert updates[k].sharding.is_equivalent_to(params[k].sharding, updates[k].ndim), k
    # Both meshes start from the same numbers; the one-device step is run from the Auto init.
    _assert_trees_equal(jax.device_get(state), jax.device_get(_run("auto")[name][1]), "init")
    want = _one_device()[name]
    assert jax.tree.structure(new_state) == jax.tree.structure(want[1])
    _assert_trees_equal(updates, want[0], f"{kind} mesh vs one device", ulps=row.ulps)
    # A statistic reduced across shards (row.collectives: max |g|, norms) is summed in another
    # order than on one device: its rounding reaches the state elements it scales, a few ulps
    # of each element (measured: 5.5 ulps of one element of stable_spam's nu).
    _assert_trees_equal(new_state, want[1], f"{kind} mesh vs one device: state",
                        ulps=row.ulps if row.collectives is None else max(row.ulps, 16))


# The issue's own cases, at full size with the default blocks of 256: a (512, 384) leaf sharded
# P('x', 'y') got two all-gathers a step and codes / scales P('x',); a (1000, 1000) leaf got 8
# collective-permutes a step. adamw_8bit (the defaults, min_quantized_size 4096) on both kinds
# of mesh, eager init: no collective, codes like the parameter, scales over the same axes.
_BIG = {"a": ((512, 384), P("x", "y")), "b": ((1000, 1000), P("x", "y")),
        "c": ((1000, 1000), P("y", "x"))}


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_issue_cases_at_full_size(kind):
    import effjax.optim as eo

    mesh = _mesh(kind)
    rng = np.random.default_rng(3)
    with jax.set_mesh(mesh):
        put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
        params = {k: put(np.zeros(s, np.float32), spec) for k, (s, spec) in _BIG.items()}
        grads = {k: put(rng.normal(size=s).astype(np.float32), spec)
                 for k, (s, spec) in _BIG.items()}
        opt = eo.adamw_8bit(1e-3)
        state = opt.init(params)
        compiled = jit(opt.update).lower(grads, state, params).compile()
        assert not [c for c in _COLLECTIVES if c in compiled.as_text()]
        updates, new_state = compiled(grads, state, params)
    for st in (state, new_state):
        for path, q in jax.tree_util.tree_flatten_with_path(st, is_leaf=_isq)[0]:
            if not _isq(q):
                continue
            p = params[_param_of(path, _BIG)]
            assert q.codes.sharding.is_equivalent_to(p.sharding, p.ndim), path
            assert _pieces(q.absmax) == _pieces(p), (path, q.absmax.sharding)
    for k in _BIG:
        assert updates[k].sharding.is_equivalent_to(params[k].sharding, 2), k
        assert bool(jax.numpy.isfinite(updates[k]).all())
