"""Orbax checkpoints of sharded low-bit optimizer states, resumed on the same mesh and onto
other meshes (issue 19: "orbax save/restore and bit-identical resume, incl. across momentum
resets and onto another mesh").

The tree: ``odd`` (64, 96) sharded ``P('x', 'y')`` on a 4 x 2 mesh, whose (16, 48) shards cut
bitsandbytes' flat blocks of 256 (rows are grouped 8 at a time into 3 blocks), so an eager
``init`` gives it the shard-local layout (shards (4, 2)); and ``w`` (64, 64) sharded
``P('x', None)``, whose shards hold whole flat blocks (the flat layout). Optimizers:
``adamw_8bit`` (every leaf quantized), saved after 2 steps, and ``stable_spam(state_bits=8,
reset_interval=2)``, saved after 3 steps so that the checkpoint holds moments that are not
zero (step 2 resets them) and a reset (step 4) happens after the resume. Both are run by one
jitted program per mesh and layout (the compiles dominate this file's time).

What holds (see :mod:`effjax.optim._relayout`):

* ``jax.eval_shape(opt.init, params)`` describes the flat layout (tracers carry no sharding
  under Auto axes); orbax refuses it for the shard-local leaf, loudly.
* ``abstract_state(opt, params)`` gives the layouts and shardings of an eager ``init`` (checked
  for every row of the conformance table on five meshes); restoring with it on the same mesh
  gives the saved leaves exactly and the next 3 steps equal the uninterrupted run bit for bit.
* On another mesh (2 x 4: shard-local (2, 4); 1-D of 8 with ``odd`` sharded on its rows: flat;
  one device: flat) ``abstract_state(opt, params, saved=metadata)`` keeps the saved layout:
  exact restore; AdamW's next 3 steps equal the uninterrupted run bit for bit; Stable-SPAM's
  equal the saved state moved in memory to that mesh and stepped there, and differ from the
  original mesh's run only in the rounding of its per-tensor norms (summed in another order).
* ``relayout`` then gives the new mesh's layouts (no data-moving collective in the step), the
  only lossy step: each changed moment is the nearest code at the new block's scale of the old
  dequantized value, within the bound its docstring states.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import effjax.optim as eo
from effjax.quant import QuantizedArray, dequantize_blockwise
from tests.optim.test_optim_conformance import ROWS

# When one leaf's restore fails (test_eval_shape_target_is_refused_loudly), orbax abandons the
# reads of the other leaves; their coroutines are reported as unraisable exceptions when its
# next restore (a later test here) collects them.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
_isq = lambda x: isinstance(x, QuantizedArray)  # noqa: E731

SHAPES = {"odd": (64, 96), "w": (64, 64)}
LR = 1e-2
OPTS = {"adamw_8bit": eo.adamw_8bit(LR, min_quantized_size=0),
        "stable_spam": eo.stable_spam(LR, reset_interval=2, state_bits=8)}
SAVED_AT = {"adamw_8bit": 2, "stable_spam": 3}  # steps before the checkpoint
RESUMED = 3  # steps after it
_COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")

_rng = np.random.default_rng(1905)
P0 = {k: np.asarray(_rng.normal(size=s), np.float32) for k, s in SHAPES.items()}
GRADS = [{k: np.asarray(_rng.normal(size=s), np.float32) for k, s in SHAPES.items()}
         for _ in range(6)]


@functools.cache
def _mesh(name):
    assert jax.device_count() == 8, "tests/conftest.py sets 8 CPU devices"
    if name == "one device":
        return None
    if name == "8":
        return jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    shape = (4, 2) if name.startswith("4x2") else (2, 4)
    kind = AxisType.Explicit if name.endswith("explicit") else AxisType.Auto
    return jax.make_mesh(shape, ("x", "y"), axis_types=(kind,) * 2)


def _specs(name):
    if name == "8":
        return {"odd": P("x", None), "w": P("x", None)}
    return {"odd": P("x", "y"), "w": P("x", None)}


# The layout of odd's moments an eager init picks (w: flat everywhere). 2 x 4: (32, 24) shards
# cut the groups of 8 rows; 1-D of 8: (8, 96) shards hold whole groups; one device: flat.
LAYOUT = {"4x2": (4, 2), "4x2 explicit": (4, 2), "2x4": (2, 4), "8": None, "one device": None}


def _sharding(mesh_name, key):
    mesh = _mesh(mesh_name)
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, _specs(mesh_name)[key])


def _put(tree, mesh_name):
    return {k: jax.device_put(v, _sharding(mesh_name, k)) for k, v in tree.items()}


def _abstract_params(mesh_name):
    return {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=_sharding(mesh_name, k))
            for k, s in SHAPES.items()}


@jit
def _step(grads, states, params):
    """One step of every optimizer (each on its own state, parameters and gradients)."""
    out_s, out_p = {}, {}
    for n, opt in OPTS.items():
        u, out_s[n] = opt.update(grads[n], states[n], params[n])
        out_p[n] = optax.apply_updates(params[n], u)
    return out_s, out_p


def _resume(states, params, mesh_name):
    """The RESUMED steps after the checkpoint; returns (states, params) after each."""
    out = []
    for i in range(RESUMED):
        grads = {n: _put(GRADS[SAVED_AT[n] + i], mesh_name) for n in OPTS}
        states, params = _step(grads, states, params)
        out.append((states, params))
    return out


def _equal_leaves(a, b, what):
    la, da = jax.tree.flatten(a)
    lb, db = jax.tree.flatten(b)
    assert da == db, (what, da, db)  # layouts (QuantizedArray.shards) included
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], lb):
        assert np.array_equal(np.asarray(x), np.asarray(y)), (what, jax.tree_util.keystr(path))


def _layouts(state):
    return [x.shards for x in jax.tree.leaves(state, is_leaf=_isq) if _isq(x)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The uninterrupted run on the 4 x 2 mesh (6 steps of each optimizer, every state kept)
    and an orbax checkpoint of {params, opt_state} after SAVED_AT[name] steps."""
    params = _put(P0, "4x2")
    states = {n: opt.init(params) for n, opt in OPTS.items()}
    assert _layouts(states["adamw_8bit"]) == [(4, 2), None] * 2  # mu, nu of odd and w
    hist = [(states, {n: params for n in OPTS})]
    for g in GRADS:
        hist.append(_step({n: _put(g, "4x2") for n in OPTS}, *hist[-1]))
    ckpt = {"params": {n: hist[SAVED_AT[n]][1][n] for n in OPTS},
            "opt_state": {n: hist[SAVED_AT[n]][0][n] for n in OPTS}}
    path = tmp_path_factory.mktemp("sharded_ckpt") / "ckpt"
    with ocp.StandardCheckpointer() as c:
        c.save(path, ckpt)
        c.wait_until_finished()
        meta = c.metadata(path).item_metadata.tree
    after = {n: [(hist[SAVED_AT[n] + i][0][n], hist[SAVED_AT[n] + i][1][n])
                 for i in range(1, RESUMED + 1)] for n in OPTS}
    return dict(path=path, ckpt=ckpt, meta=meta, after=after)


def _restore(saved, mesh_name, *, keep_saved_layout):
    params = _abstract_params(mesh_name)
    target = {"params": {n: params for n in OPTS},
              "opt_state": {n: eo.abstract_state(
                  opt, params, saved=saved["meta"]["opt_state"][n] if keep_saved_layout
                  else None) for n, opt in OPTS.items()}}
    with ocp.StandardCheckpointer() as c:
        return c.restore(saved["path"], target)


# 1. The restore target ---------------------------------------------------------------------

@pytest.mark.parametrize("mesh_name", list(LAYOUT))
def test_abstract_state_is_eager_inits_layout_and_sharding(mesh_name):
    """For both optimizers here and adamw_4bit (4-bit codes packed per shard) on Auto and
    Explicit 4 x 2, 2 x 4, 1-D and one-device placements, and every row of the optimizer
    conformance table on the 4 x 2 mesh (the eager inits on Explicit axes run without
    ``jax.set_mesh``, as they do on Auto axes): ``abstract_state`` has the pytree of
    an eager ``init`` (QuantizedArray layouts included), its shapes and dtypes, and its
    shardings (0-d leaves: one copy everywhere); odd's moments get the expected layout."""
    params = _put(P0, mesh_name)
    opts = dict(OPTS, adamw_4bit=eo.adamw_4bit(LR, min_quantized_size=0))
    if mesh_name == "4x2":  # every row once (the eager inits cost a compile per leaf)
        opts.update({n: r.factory(r.lr, **r.kwargs) for n, r in ROWS.items()})
    for name, opt in opts.items():
        want, got = opt.init(params), eo.abstract_state(opt, params)
        assert jax.tree.structure(got) == jax.tree.structure(want), name
        for (path, w), g in zip(jax.tree_util.tree_flatten_with_path(want)[0],
                                jax.tree.leaves(got)):
            where = (mesh_name, name, jax.tree_util.keystr(path))
            assert (g.shape, g.dtype) == (w.shape, w.dtype), where
            assert isinstance(g, jax.ShapeDtypeStruct), where
            if w.ndim == 0:
                assert g.sharding.is_fully_replicated, (where, g.sharding)
            else:
                assert g.sharding.is_equivalent_to(w.sharding, w.ndim), (where, g.sharding,
                                                                         w.sharding)
    assert _layouts(eo.abstract_state(OPTS["adamw_8bit"], params)) == \
        [LAYOUT[mesh_name], None] * 2


def test_eval_shape_target_is_refused_loudly(saved):
    """The target orbax's docs suggest, ``jax.eval_shape(opt.init, params)`` with shardings,
    describes the flat layout; orbax refuses the shard-local leaf (never a silent mix-up: the
    two layouts' scales have different shapes)."""
    params = _put(P0, "4x2")
    abstract = jax.eval_shape(OPTS["adamw_8bit"].init, params)
    assert _layouts(abstract) == [None] * 4
    rep = NamedSharding(_mesh("4x2"), P())
    target = {"params": saved["ckpt"]["params"],
              "opt_state": dict(saved["ckpt"]["opt_state"], adamw_8bit=jax.tree.map(
                  lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract))}
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                          if isinstance(x, jax.Array) else x, target)
    with ocp.StandardCheckpointer() as c, pytest.raises(ValueError, match="stored shape"):
        c.restore(saved["path"], target)


# 2. Resuming -------------------------------------------------------------------------------

def test_resume_on_the_same_mesh_is_bit_identical(saved):
    """Restored with ``abstract_state``: every leaf equals the saved one (codes and scales of
    the shard-local leaf included) with its sharding, and the next 3 steps (a momentum reset of
    Stable-SPAM among them) equal the uninterrupted run bit for bit."""
    r = _restore(saved, "4x2", keep_saved_layout=False)
    _equal_leaves(r, saved["ckpt"], "restored")
    for got, want in zip(jax.tree.leaves(r), jax.tree.leaves(saved["ckpt"])):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim) or got.ndim == 0
    steps = _resume(r["opt_state"], r["params"], "4x2")
    for n in OPTS:
        for i, (s, p) in enumerate(steps):
            _equal_leaves((s[n], p[n]), saved["after"][n][i], f"{n}, step {SAVED_AT[n] + i + 1}")
    # a reset happened after the resume: Stable-SPAM's step 4 (the first resumed) zeroed the
    # moments that the checkpoint held non-zero
    before, after = r["opt_state"]["stable_spam"][0], steps[0][0]["stable_spam"][0]
    for field in ("mu", "nu"):
        for k in SHAPES:
            assert np.any(np.asarray(getattr(before, field)[k].absmax) != 0), (field, k)
            assert not np.any(np.asarray(getattr(after, field)[k].absmax)), (field, k)


OTHER_MESHES = ("2x4", "8", "one device")


@pytest.fixture(scope="module")
def kept(saved):
    """``kept(mesh_name)``: the checkpoint restored onto another mesh in its saved layouts
    (once per mesh)."""
    cache = {}

    def get(mesh_name):
        if mesh_name not in cache:
            cache[mesh_name] = _restore(saved, mesh_name, keep_saved_layout=True)
        return cache[mesh_name]

    return get


@pytest.mark.parametrize("mesh_name", OTHER_MESHES)
def test_resume_onto_another_mesh_keeps_the_saved_layout(saved, kept, mesh_name):
    """``abstract_state(opt, params, saved=metadata)`` on the new mesh: the saved leaves and
    layouts, exactly, on the new devices. AdamW's next 3 steps equal the uninterrupted run bit
    for bit; Stable-SPAM's equal the saved state moved in memory to the new mesh and stepped
    there, bit for bit, and the uninterrupted run up to the rounding of its per-tensor norms."""
    r = kept(mesh_name)
    _equal_leaves(r, saved["ckpt"], "restored")  # the saved layouts: (4, 2) for odd
    devices = set(jax.devices()) if _mesh(mesh_name) else {jax.devices()[0]}
    assert all(x.sharding.device_set == devices for x in jax.tree.leaves(r))
    steps = _resume(r["opt_state"], r["params"], mesh_name)
    target = jax.tree.map(lambda x: x.sharding, r)
    moved = jax.device_put(saved["ckpt"], target)  # the uninterrupted state on the new mesh
    in_memory = _resume(moved["opt_state"], moved["params"], mesh_name)
    for i in range(RESUMED):
        _equal_leaves(steps[i], in_memory[i], f"step {i + 1} after the restore")
        _equal_leaves((steps[i][0]["adamw_8bit"], steps[i][1]["adamw_8bit"]),
                      saved["after"]["adamw_8bit"][i], f"adamw_8bit, resumed step {i + 1}")
        # ||g||, ||m||... of Stable-SPAM are sums over the leaf: on another mesh (or device)
        # they are summed in another order and may differ in their last bits (measured: the
        # norms by 1e-7 relative, the parameters by about 1e-9, 1e-9 of their largest entry,
        # after 3 steps), which may move a code by one. A wrong restore would differ by O(1).
        got_s, got_p = steps[i][0]["stable_spam"], steps[i][1]["stable_spam"]
        want_s, want_p = saved["after"]["stable_spam"][i]
        assert jax.tree.structure(got_s) == jax.tree.structure(want_s)
        for x, y in zip(jax.tree.leaves((got_s, got_p)), jax.tree.leaves((want_s, want_p))):
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            assert np.max(np.abs(x - y), initial=0) <= 1e-5 * np.max(np.abs(y), initial=1e-30)


def _collectives(fn, *args) -> set[str]:
    text = fn.lower(*args).compile().as_text()
    return {c for c in _COLLECTIVES if c in text}


def _max_rounding_distance(codebook, signed: bool) -> float:
    """The largest distance from a point of the codebook's range ([-1, 1], unsigned: [0, 1])
    to the nearest codebook value."""
    v = np.sort(np.asarray(codebook, np.float64))
    ends = [v[0] - (-1.0 if signed else 0.0), 1.0 - v[-1]]
    return float(max(np.max(np.diff(v)) / 2, *ends))


def _check_requantized(old, new, where):
    """``new`` (another layout) holds, for each element, the nearest code of ``old``'s
    dequantized value x at the scale M of its new block: M = max |x| over the block (numpy),
    |decoded - x| <= d * M (the docstring's bound)."""
    x = np.asarray(dequantize_blockwise(old), np.float32)
    n0, n1 = new.shards or (1, 1)
    s0, s1 = x.shape[0] // n0, x.shape[1] // n1
    # the new layout's blocks (module docstring of effjax.quant.blockwise): each shard's local
    # array, rows of 96 (or 24) merged/grouped into rows of whole blocks of 256, in order
    grid = x.reshape(n0, s0, n1, s1).transpose(0, 2, 1, 3)
    blocks = grid.reshape(n0 * n1, -1, new.block_size)
    m = np.abs(blocks).max(-1)
    np.testing.assert_array_equal(np.asarray(new.absmax).ravel(), m.ravel(), err_msg=where)
    scale = np.repeat(m.ravel(), new.block_size).reshape(n0, n1, s0, s1)
    scale = scale.transpose(0, 2, 1, 3).reshape(x.shape)
    book = np.asarray(new.codebook, np.float32)
    decoded = book[np.asarray(new.codes)]  # 8-bit codes: one per element, in place
    y = x * (np.float32(1) / scale)
    nearest = np.min(np.abs(book[None, :] - y.reshape(-1, 1)), axis=1).reshape(x.shape)
    assert np.all(np.abs(decoded - y) <= nearest + 1e-6), where
    signed = bool(np.min(book) < 0)
    d = _max_rounding_distance(new.codebook, signed)
    assert d <= (0.0071 if signed else 0.0036), (where, d)  # relayout's docstring
    assert np.all(np.abs(decoded * scale - x) <= (d + 1e-6) * scale), where  # 1e-6: float32
    assert not np.array_equal(decoded * scale, x), where  # the requantization is lossy here


@pytest.mark.parametrize("mesh_name", ["2x4", "8"])
def test_relayout_onto_another_mesh(saved, kept, mesh_name):
    """``relayout(restored, abstract_state(opt, params))``: the new mesh's layouts (an eager
    init's: shard-local (2, 4) on 2 x 4, flat on the 1-D mesh), each changed moment
    requantized within the stated bound, unchanged leaves exact, and AdamW's step without
    any collective again (restored in the saved layout it all-gathers; one device has no
    collective to lose and the same requantization to flat as the 1-D mesh)."""
    r = kept(mesh_name)
    params = _abstract_params(mesh_name)
    out = {n: eo.relayout(r["opt_state"][n], eo.abstract_state(opt, params))
           for n, opt in OPTS.items()}
    for n in OPTS:
        assert _layouts(out[n]) == [LAYOUT[mesh_name], None] * 2, n
        pairs = zip(jax.tree_util.tree_flatten_with_path(r["opt_state"][n], is_leaf=_isq)[0],
                    jax.tree.leaves(out[n], is_leaf=_isq))
        for (path, old), new in pairs:
            where = f"{n}{jax.tree_util.keystr(path)} on {mesh_name}"
            if _isq(old) and old.shards != new.shards:
                _check_requantized(old, new, where)
            else:
                _equal_leaves(old, new, where)
    grads = _put(GRADS[SAVED_AT["adamw_8bit"]], mesh_name)
    assert not _collectives(jit(OPTS["adamw_8bit"].update), grads, out["adamw_8bit"],
                            r["params"]["adamw_8bit"])


def test_saved_layouts_from_a_state(saved):
    """``saved=`` also takes a state (here the saved one, concrete): the same target as from
    the checkpoint's metadata."""
    params = _abstract_params("2x4")
    opt = OPTS["adamw_8bit"]
    from_state = eo.abstract_state(opt, params, saved=saved["ckpt"]["opt_state"]["adamw_8bit"])
    from_meta = eo.abstract_state(opt, params, saved=saved["meta"]["opt_state"]["adamw_8bit"])
    assert _layouts(from_state) == [(4, 2), None] * 2
    assert jax.tree.structure(from_state) == jax.tree.structure(from_meta)
    assert jax.tree.leaves(from_state) == jax.tree.leaves(from_meta)


# 3. Bad input ------------------------------------------------------------------------------

def test_bad_saved_metadata_and_target_name_the_leaf(saved):
    params = _abstract_params("2x4")
    meta = saved["meta"]["opt_state"]["adamw_8bit"]
    other_block = eo.adamw_8bit(LR, min_quantized_size=0, block_size=128)
    with pytest.raises(ValueError, match=r"\[0\]\.mu\['odd'\].*block"):
        eo.abstract_state(other_block, params, saved=meta)
    with pytest.raises(ValueError, match=r"saved= has no entry .*\['odd'\]"):
        eo.abstract_state(OPTS["adamw_8bit"], params, saved={"count": meta[0]["count"]})
    target_4bit = eo.abstract_state(eo.adamw_4bit(LR, min_quantized_size=0), params)
    with pytest.raises(ValueError, match=r"\[0\]\.mu\['odd'\] is 8-bit.*4-bit"):
        eo.relayout(eo.abstract_state(OPTS["adamw_8bit"], params), target_4bit)
    with pytest.raises(ValueError, match="different trees"):
        eo.relayout(eo.abstract_state(OPTS["adamw_8bit"], params),
                    eo.abstract_state(OPTS["stable_spam"], params))
