"""effjax.nn.interception: one hook mechanism for NNX and Linen Linear/Dense,
LinearGeneral/DenseGeneral and Einsum, used by the adapter fast path, calibrate and activation
fake quantization; restored on exceptions, thread-safe, jit-safe, no class patched."""

import dataclasses
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from effjax.nn import (
    FakeQuantActivations,
    LayerCall,
    adapted_layers,
    contract,
    fake_quantize_activations,
    intercept,
    is_intercepted,
    layer_hooks,
    linen_activation_fake_quant,
    linen_adapted_layers,
    linen_intercept,
    quantize_activations,
)
from effjax.peft import LoRA, calibrate, inject, is_adapter, materialize

# layer kind -> (NNX layer, Linen layer, input shape, contracted input axes, LoRA config)
KINDS = {
    "linear": (lambda: nnx.Linear(6, 5, rngs=nnx.Rngs(0)), lambda: nn.Dense(5),
               (2, 3, 6), (2,), LoRA(rank=2)),
    "general": (lambda: nnx.LinearGeneral((2, 3), 5, axis=(-2, -1), rngs=nnx.Rngs(0)),
                lambda: nn.DenseGeneral(5, axis=(-2, -1)), (2, 4, 2, 3), (2, 3),
                LoRA(rank=2, in_axes=(0, 1))),
    "einsum": (lambda: nnx.Einsum("btd,dhk->bthk", (6, 2, 4), (2, 4), rngs=nnx.Rngs(0)),
               lambda: nn.Einsum((6, 2, 4), "btd,dhk->bthk"), (2, 3, 6), (2,), LoRA(rank=2)),
}
TYPES = {"linear": (nnx.Linear, nn.Dense), "general": (nnx.LinearGeneral, nn.DenseGeneral),
         "einsum": (nnx.Einsum, nn.Einsum)}


def _x(shape, seed=0):
    rng = np.random.default_rng(seed)
    mags = np.exp(rng.standard_normal(shape[:-1] + (1,)))  # tokens of different magnitudes
    return jnp.asarray(rng.standard_normal(shape) * mags, jnp.float32)


def _randomize(tree):
    """Adapter nodes with b != 0 (b = 0 would hide the low-rank term)."""
    fill = lambda n: n.replace(b=0.3 * jnp.ones_like(n.b)) if is_adapter(n) else n
    return jax.tree.map(fill, tree, is_leaf=is_adapter)


class _Setup:
    """One layer of one kind in one framework: ``run(params, x, ctx)`` applies it."""

    def __init__(self, framework, kind):
        make_nnx, make_linen, self.x_shape, self.axes, self.lora = KINDS[kind]
        self.framework, self.kind = framework, kind
        self.x = _x(self.x_shape)
        if framework == "nnx":
            self.model = make_nnx()
            self.graphdef, self.params = nnx.split(self.model)
        else:
            self.model = make_linen()
            self.params = self.model.init(jax.random.key(0), self.x)["params"]

    def apply(self, params, x, model=None):
        if self.framework == "nnx":
            graphdef = nnx.split(model)[0] if model is not None else self.graphdef
            return nnx.merge(graphdef, params)(x)
        return self.model.apply({"params": params}, x)


CASES = [(f, k) for f in ("nnx", "linen") for k in KINDS]


@pytest.mark.parametrize("framework,kind", CASES)
def test_adapter_fast_path(framework, kind):
    s = _Setup(framework, kind)
    tree = _randomize(inject(s.params, {"kernel": s.lora}, key=jax.random.key(1)))
    want = s.apply(materialize(tree), s.x)
    if framework == "nnx":
        fast = adapted_layers(s.model)
        assert type(fast) is type(s.model) and is_intercepted(fast)
        got = s.apply(tree, s.x, model=fast)
    else:
        with linen_adapted_layers():
            got = s.apply(tree, s.x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(want - s.apply(s.params, s.x)).max()) > 1e-2  # the delta counts


@pytest.mark.parametrize("framework,kind", CASES)
def test_calibrate(framework, kind):
    s = _Setup(framework, kind)
    xs = [s.x, _x(s.x_shape, seed=1)]
    if framework == "nnx":
        stats = calibrate(s.model, xs)
    else:
        stats = calibrate(s.model, xs, variables={"params": s.params})
    assert list(stats) == ["kernel"]  # the path inject sees in the layer's own params
    n_in = int(np.prod([s.x_shape[a] for a in s.axes]))
    x = np.concatenate([np.asarray(b, np.float64).reshape(-1, n_in) for b in xs])
    st = stats["kernel"]
    np.testing.assert_allclose(np.asarray(st.gram), x.T @ x, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(st.sum), x.sum(0), rtol=1e-5, atol=1e-4)
    assert float(st.count) == x.shape[0]


@pytest.mark.parametrize("framework,kind", CASES)
def test_activation_fake_quant(framework, kind):
    s = _Setup(framework, kind)
    types = (TYPES[kind][0 if framework == "nnx" else 1],)
    xq = fake_quantize_activations(s.x, 4, axis=s.axes)  # one scale per token
    want = s.apply(s.params, xq)
    if framework == "nnx":
        q = quantize_activations(s.model, bits=4, layer_types=types)
        assert layer_hooks(q) == (FakeQuantActivations(bits=4),)
        got = s.apply(nnx.state(q), s.x, model=q)
    else:
        with linen_activation_fake_quant(4, layer_types=types):
            got = s.apply(s.params, s.x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(got), np.asarray(s.apply(s.params, s.x)), atol=1e-3)


# ------------------------------------------------------------------------- the mechanism


def _scale(factor, sleep=0.0):
    def hook(call, next):
        if sleep:
            time.sleep(sleep)  # let another thread run while this one is inside its hook
        return next(call.replace(inputs=factor * call.inputs))
    return hook


class _Net(nnx.Module):
    def __init__(self):
        self.up = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
        self.down = nnx.Linear(8, 3, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.down(jnp.tanh(self.up(x)))


class _LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="down")(jnp.tanh(nn.Dense(8, name="up")(x)))


def _manual(p, x, factor):
    """_Net / _LinenNet with every layer's input scaled by ``factor``."""
    h = jnp.tanh(factor * x @ p["up"]["kernel"] + p["up"]["bias"])
    return factor * h @ p["down"]["kernel"] + p["down"]["bias"]


def _nnx_params(model):
    return {k: {n: v[...] for n, v in (("kernel", getattr(model, k).kernel),
                                       ("bias", getattr(model, k).bias))}
            for k in ("up", "down")}


def test_exception_in_forward_leaves_everything_plain():
    def boom(call, next):
        raise RuntimeError("boom")

    x = _x((2, 4))
    model = _Net()
    y_plain = model(x)
    broken = intercept(model, boom)
    with pytest.raises(RuntimeError, match="boom"):
        broken(x)
    # the input model was never changed: plain, and other copies are unaffected
    assert layer_hooks(model.up) is None and not is_intercepted(model.down)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(y_plain))
    np.testing.assert_allclose(np.asarray(intercept(model, _scale(2.0))(x)),
                               np.asarray(_manual(_nnx_params(model), x, 2.0)), rtol=1e-5)

    net = _LinenNet()
    v = net.init(jax.random.key(0), x)
    with pytest.raises(RuntimeError, match="boom"), linen_intercept(boom):
        net.apply(v, x)
    np.testing.assert_array_equal(np.asarray(net.apply(v, x)),
                                  np.asarray(_manual(v["params"], x, 1.0)))
    seen = []

    def record(call, next):
        seen.append(call.path)
        return next(call)

    with linen_intercept(record):  # only this context's hook is active now
        net.apply(v, x)
    assert seen == ["up", "down"]


def test_threads_with_differently_intercepted_models():
    x = _x((2, 4))
    model = _Net()
    p = _nnx_params(model)
    net = _LinenNet()
    v = net.init(jax.random.key(0), x)
    want = {f: np.asarray(_manual(p, x, f)) for f in (2.0, 3.0)}
    want_linen = {f: np.asarray(_manual(v["params"], x, f)) for f in (2.0, 3.0)}
    plain = np.asarray(model(x))
    barrier, errors = threading.Barrier(2), []

    def work(factor):
        try:
            m = intercept(model, _scale(factor, sleep=1e-3))
            barrier.wait()
            for _ in range(5):
                np.testing.assert_allclose(np.asarray(m(x)), want[factor], rtol=1e-5)
                with linen_intercept(_scale(factor, sleep=1e-3)):
                    y = net.apply(v, x)
                np.testing.assert_allclose(np.asarray(y), want_linen[factor], rtol=1e-5)
                np.testing.assert_array_equal(np.asarray(model(x)), plain)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(f,)) for f in (2.0, 3.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_jit():
    x = _x((2, 4))
    model = _Net()
    a, b = intercept(model, FakeQuantActivations(bits=8)), intercept(model, FakeQuantActivations(8))
    ga, sa = nnx.split(a)
    assert ga == nnx.split(b)[0]  # equal hooks, equal graphdefs: one compilation serves both
    traces = []

    @jax.jit
    def f(state, x):
        traces.append(1)
        return nnx.merge(ga, state)(x)

    y = f(sa, x)
    f(nnx.split(b)[1], x)
    assert len(traces) == 1
    np.testing.assert_allclose(np.asarray(y), np.asarray(a(x)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(a, x)), np.asarray(y),
                               rtol=1e-6)
    # Linen: the context inside the traced function; a function traced outside is plain
    net = _LinenNet()
    v = net.init(jax.random.key(0), x)

    @jax.jit
    def g(v, x):
        with linen_intercept(_scale(2.0)):
            return net.apply(v, x)

    plain = jax.jit(net.apply)
    y0 = plain(v, x)  # traced outside a context
    np.testing.assert_allclose(np.asarray(g(v, x)), np.asarray(_manual(v["params"], x, 2.0)),
                               rtol=1e-5)
    with linen_intercept(_scale(2.0)):
        y_plain = plain(v, x)  # the cached trace: not re-traced, so not intercepted
    np.testing.assert_array_equal(np.asarray(y_plain), np.asarray(y0))
    np.testing.assert_allclose(np.asarray(y_plain), np.asarray(net.apply(v, x)), rtol=1e-6)


def test_hooks_compose():
    x = _x((2, 4))
    add = lambda call, next: next(call.replace(inputs=call.inputs + 1.0))
    model = _Net()
    twice = intercept(intercept(model, _scale(2.0)), add)  # add runs first, then scale
    assert len(layer_hooks(twice.up)) == 2

    def want(p):
        h = jnp.tanh(2.0 * (x + 1.0) @ p["up"]["kernel"] + p["up"]["bias"])
        return 2.0 * (h + 1.0) @ p["down"]["kernel"] + p["down"]["bias"]

    np.testing.assert_allclose(np.asarray(twice(x)), np.asarray(want(_nnx_params(model))),
                               rtol=1e-5)
    net = _LinenNet()
    v = net.init(jax.random.key(0), x)
    with linen_intercept(_scale(2.0)), linen_intercept(add):  # the inner context runs first
        y = net.apply(v, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(want(v["params"])), rtol=1e-5)
    # inner=True: after every other hook (it sees what they pass on)
    seen = []
    last = lambda call, next: seen.append(np.asarray(call.inputs)) or next(call)
    intercept(twice, last, "up", inner=True)(x)
    with linen_intercept(last, "up", inner=True), linen_intercept(_scale(2.0)), \
            linen_intercept(add):
        net.apply(v, x)
    for got in seen:
        np.testing.assert_allclose(got, np.asarray(2.0 * (x + 1.0)), rtol=1e-6)
    # so calibrate (inner=True) records what the kernel receives, e.g. quantized inputs
    st = calibrate(quantize_activations(model, bits=4), [x])["up/kernel"]
    xq = np.asarray(fake_quantize_activations(x, 4), np.float64)
    np.testing.assert_allclose(np.asarray(st.gram), xq.T @ xq, rtol=1e-5, atol=1e-5)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Masked:
    """A structured kernel that is not an adapter node (a future masked / quantized weight):
    ``materialize() = w * mask``."""

    w: jax.Array
    mask: jax.Array

    def materialize(self):
        return self.w * self.mask

    def __getitem__(self, index):  # NNX reads a Param's value as param[...]
        assert index is Ellipsis
        return self


@pytest.mark.parametrize("framework", ["nnx", "linen"])
def test_hooks_receive_structured_kernels(framework):
    s = _Setup(framework, "linear")
    mask = jnp.asarray(np.random.default_rng(0).random((6, 5)) > 0.5, jnp.float32)
    kernel = s.params["kernel"]
    w = kernel[...] if framework == "nnx" else kernel
    seen = []

    def record(call, next):
        seen.append(type(call.kernel).__name__)
        return next(call)

    if framework == "nnx":
        s.params["kernel"].set_value(_Masked(w, mask))
        y = s.apply(s.params, s.x, model=intercept(s.model, record))
    else:
        with linen_intercept(record):
            y = s.model.apply({"params": {**s.params, "kernel": _Masked(w, mask)}}, s.x)
    assert seen == ["_Masked"]
    want = s.x @ (w * mask) + s.params["bias"][...]
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_contract_and_layer_call():
    x, k = _x((2, 3, 4)), _x((4, 5), seed=1)
    call = LayerCall(inputs=x, kernel=k, dimension_numbers=(((2,), (0,)), ((), ())))
    np.testing.assert_allclose(np.asarray(contract(call)), np.asarray(x @ k), rtol=1e-6)
    e = LayerCall(inputs=_x((3, 2, 4)), kernel=_x((3, 4, 5)), einsum_str="ebi,eio->ebo",
                  op=jnp.einsum)
    assert e.contracted_axes == (2,) and e.batch_axes == (0,)
    g = LayerCall(inputs=_x((2, 2, 3)), kernel=_x((3, 2, 5)),
                  dimension_numbers=(((1, 2), (1, 0)), ((), ())))
    assert g.contracted_axes == (2, 1)  # in the kernel's axis order


def test_bad_arguments():
    with pytest.raises(TypeError, match="needs an NNX module"):
        intercept(nn.Dense(3))
    with pytest.raises(TypeError, match="not a subclass of nnx.Linear"):
        intercept(_Net(), layer_types=(nnx.Conv,))
    with pytest.raises(ValueError, match="where='mid' selects none of the 2 .*'up'"):
        intercept(_Net(), where="mid")
    with pytest.raises(TypeError, match="not a subclass of nn.Dense"), \
            linen_intercept(layer_types=(nn.Conv,)):
        pass
