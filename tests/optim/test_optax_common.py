"""optax's own common optimizer checks, run over every optimizer of ``effjax.optim``.

optax 0.2.8 runs one set of checks over each of its contributed optimizers
(``optax/contrib/_common_test.py``, class ``ContribTest``). They are transcribed here check for
check, on optax's own targets (imported from that module), for every effjax optimizer factory
with its default settings and, for the low-bit ones, with every leaf quantized
(``min_quantized_size=0``, blocks of 2 elements: the targets' leaves have 2 to 20):

1. extra args: ``update`` accepts an unexpected keyword argument under ``jit``, and the jitted
   step does not recompile on its second call (the state keeps its types);
2. convergence: ``optax.tree.map_params`` works on the state, and 30 000 steps reach optax's
   four targets (parabola, Rosenbrock, 2-D parabola, mixed 1-D/2-D) within rtol = atol = 3e-2;
3. ``inject_hyperparams``: every numeric argument injected (but the ones optax or the effjax
   docstrings declare static) gives the unwrapped optimizer's updates and state (structure,
   shapes and dtypes equal, values within optax's 1e-5);
4. dtype: updates have the parameters' dtype, and the state's types are unchanged by an update
   (optax's ``lax.cond`` between updating and not), for float16, bfloat16, float32 and float64
   (under ``jax.enable_x64``);
5. gradient accumulation: in ``optax.MultiSteps(opt, 4)`` the first mini-step's update is 0;
6. schedules: ``learning_rate`` is annotated with the real ``optax.ScalarOrSchedule`` (optax's
   schedule test inspects the signature and skips otherwise), and 10 steps with
   ``constant_schedule(1e-3)`` equal 10 steps with ``1e-3``.

What differs from optax's file, for the suite's time budget only (no check is weaker):

* optax optimizes its four targets one by one; here they are the leaves of one tree, optimized
  in one program. Every effjax optimizer acts leaf by leaf (per-tensor statistics, projections
  and quantization blocks are per leaf), so each target follows exactly its own run.
* Checks 1, 2, 3, 5 and 6 share one jitted program per optimizer: a ``fori_loop`` over a
  traced number of steps on the targets (the unexpected keyword passed at every step), plus the
  small checks on fixed inputs; the schedule check runs on the four targets (optax: the
  parabola) with the optimizer's own learning rate (optax: 1e-3).
* The type checks (4) are properties of the traced program: ``jax.eval_shape`` traces the
  update as ``jit`` would (raising the same ``lax.cond`` type error) without compiling it.

Transformations without a learning rate run as optax's wrappers do, in front of
``optax.scale_by_learning_rate``; their own numeric arguments are injected too. Those that an
alias above only wraps (``scale_by_adam_8bit``, ``scale_by_spam``, ``scale_by_stable_spam``,
``galore``, ``fira``) are left to their alias, for the suite's time budget.
"""

import functools
import inspect
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax._src import test_utils as optax_test_utils
from optax.contrib import _common_test as optax_common

import effjax.optim as eo

# Skip LLVM's optimization passes to cut compile time on the small test machine (as the other
# optimizer tests do): the program is the same, float results can differ in the last bit.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

TARGETS = (optax_common._setup_parabola, optax_common._setup_rosenbrock,
           optax_common._setup_matrix_parabola, optax_common._setup_mixed_tensor_target)
# optax's hyper-parameters that inject_hyperparams cannot take (its list), and effjax's
# documented static ones (the low-bit aliases' block layout, the optimizers' state format).
STATIC = ("warmup_steps", "num_betas", "clip_value_fn", "ns_steps", "rank", "update_proj_gap",
          "block_size", "min_quantized_size", "state_bits")
Q = dict(min_quantized_size=0, block_size=2)  # every leaf quantized, several blocks a leaf
EXTRA = {"unexpected_extra_args_your_optimizer_doesnt_expect": 1}
DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def _with_lr(transform, **fixed):
    """``factory(learning_rate, **transform's own arguments)`` = ``chain(transform(...),
    scale_by_learning_rate(learning_rate))``, with a signature that lists the transform's
    arguments (so that inject_hyperparams injects them)."""
    def factory(learning_rate, **kwargs):
        return optax.chain(transform(**fixed, **kwargs),
                           optax.scale_by_learning_rate(learning_rate))
    sig = inspect.signature(transform)
    lr = inspect.Parameter("learning_rate", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                           annotation=optax.ScalarOrSchedule)
    rest = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values()
            if p.name not in fixed]
    factory.__signature__ = sig.replace(parameters=[lr, *rest])
    factory.__name__ = factory.__qualname__ = f"{transform.__name__}_then_lr"
    return factory


def quantize_state_adamw(learning_rate: optax.ScalarOrSchedule, b1=0.9, b2=0.999, eps=1e-8,
                         weight_decay=1e-4, *, block_size=None, min_quantized_size=4096):
    """``quantize_state(optax.adamw(...))`` as an optax-style factory."""
    return eo.quantize_state(optax.adamw(learning_rate, b1, b2, eps, weight_decay=weight_decay),
                             block_size=block_size, min_quantized_size=min_quantized_size)


def perp_grad_adamw(learning_rate: optax.ScalarOrSchedule, weight_decay=1e-4):
    """The paper's perpAdamW."""
    return optax.chain(eo.perp_grad(), optax.adamw(learning_rate, weight_decay=weight_decay))


class Case(NamedTuple):
    factory: Callable[..., optax.GradientTransformation]
    kwargs: dict  # the factory's arguments, learning_rate included (optax's opt_kwargs)
    converges: bool = True  # False: the method does not aim at the loss minimum (docstring)


LOWBIT = {
    "adamw_8bit": (eo.adamw_8bit, 1e-2), "adam_8bit": (eo.adam_8bit, 1e-2),
    "lion_8bit": (eo.lion_8bit, 1e-3), "sgd_8bit": (eo.sgd_8bit, 1e-3),
    "rmsprop_8bit": (eo.rmsprop_8bit, 1e-2), "adagrad_8bit": (eo.adagrad_8bit, 1e-1),
    "ademamix_8bit": (eo.ademamix_8bit, 1e-2), "adam_4bit": (eo.adam_4bit, 1e-2),
    "adamw_4bit": (eo.adamw_4bit, 1e-2), "quantize_state(adamw)": (quantize_state_adamw, 1e-2),
}
CASES: dict[str, Case] = {}
for _name, (_factory, _lr) in LOWBIT.items():
    CASES[_name] = Case(_factory, dict(learning_rate=_lr))
    CASES[_name + "[q]"] = Case(_factory, dict(learning_rate=_lr, **Q))
CASES.update({
    "spam": Case(eo.spam, dict(learning_rate=1e-2)),
    "stable_spam": Case(eo.stable_spam, dict(learning_rate=1e-2)),
    "galore_adamw": Case(eo.galore_adamw, dict(learning_rate=1e-2, rank=1)),
    "fira_adamw": Case(eo.fira_adamw, dict(learning_rate=1e-2, rank=1)),
    "adaptive_spike_clip": Case(_with_lr(eo.adaptive_spike_clip), dict(learning_rate=1e-3)),
    "adaptive_grad_norm": Case(_with_lr(eo.adaptive_grad_norm), dict(learning_rate=1e-3)),
    "momentum_reset(adam)": Case(
        _with_lr(eo.momentum_reset, inner=optax.scale_by_adam(), interval=500),
        dict(learning_rate=1e-2)),
    # perpAdamW keeps each weight's norm from growing along itself: it is not meant to reach
    # a minimum whose norm differs from the start's (the parabola's 10.1 vs 1.7).
    "perp_grad+adamw": Case(perp_grad_adamw, dict(learning_rate=1e-2), converges=False),
    "scale_by_inverse_param_norm": Case(_with_lr(eo.scale_by_inverse_param_norm),
                                        dict(learning_rate=1e-3, eta=2.0)),
})


@functools.cache
def _opt(name):
    case = CASES[name]
    return case.factory(**case.kwargs)


def _targets(dtype):
    """optax's four targets as one tree: (initial params, final params, summed objective)."""
    setups = [setup(dtype) for setup in TARGETS]
    objectives = [obj for _, _, obj in setups]
    def objective(params):
        return sum(obj(p) for obj, p in zip(objectives, params, strict=True))
    return (tuple(p for p, _, _ in setups), tuple(f for _, f, _ in setups), objective)


# 1, 2, 3, 5, 6: one jitted program per optimizer ----------------------------------------------

def _injected(name):
    case = CASES[name]
    names = inspect.signature(case.factory).parameters
    static = tuple(a for a in STATIC if a in names)
    return optax.inject_hyperparams(case.factory, static_args=static)(**case.kwargs)


_INJECT_PARAMS = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]  # optax's inject_hyperparams check
_INJECT_GRADS = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]


def _steps(opt, objective, params, state, n, **extra):
    def body(_, carry):
        params, state = carry
        updates, state = opt.update(jax.grad(objective)(params), state, params, **extra)
        return optax.apply_updates(params, updates), state
    return jax.lax.fori_loop(0, n, body, (params, state))


@functools.cache
def _program(name):
    """``program(params, state, n)``: ``n`` steps on the four targets with optax's unexpected
    keyword argument at every step, and, from fixed inputs, the plain and the injected
    optimizer's step, MultiSteps' first updates (bfloat16, float32) and 10 steps with the
    learning rate as ``constant_schedule``."""
    case, opt, injected = CASES[name], _opt(name), _injected(name)
    with_schedule = case.factory(**{**case.kwargs, "learning_rate": optax.constant_schedule(
        case.kwargs["learning_rate"])})
    p0, _, objective = _targets(jnp.float32)
    fun = lambda x: jnp.sum(x ** 2)

    def program(params, state, n):
        params, state = _steps(opt, objective, params, state, n, **EXTRA)
        plain = opt.update(_INJECT_GRADS, opt.init(_INJECT_PARAMS), _INJECT_PARAMS)
        inj = injected.update(_INJECT_GRADS, injected.init(_INJECT_PARAMS), _INJECT_PARAMS)
        multi = []
        for dtype in (jnp.bfloat16, jnp.float32):
            ms = optax.MultiSteps(opt, every_k_schedule=4)
            x = jnp.array([1.0, 2.0], dtype=dtype)
            multi.append(ms.update(jax.grad(fun)(x), ms.init(x), x)[0])
        scheduled = _steps(with_schedule, objective, p0, with_schedule.init(p0), 10)[0]
        return params, state, (plain, inj, multi, scheduled)

    return jit(program)


@functools.cache
def _ten_steps(name):
    p0 = _targets(jnp.float32)[0]
    return _program(name)(p0, _opt(name).init(p0), 10)


@pytest.mark.parametrize("name", list(CASES))
def test_extra_args_and_no_recompilation(name):
    program, p0 = _program(name), _targets(jnp.float32)[0]
    params, state, _ = program(p0, _opt(name).init(p0), 2)  # update works with extra args
    with optax_test_utils.log_compilations() as compilations:
        program(params, state, 1)
    assert not compilations, "the optimizer recompiles on the second call to update"


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n].converges])
def test_converges_on_optax_targets(name):
    p0, final, _ = _targets(jnp.float32)
    state = optax.tree.map_params(_opt(name), lambda v: v, _opt(name).init(p0))
    params, _, _ = _program(name)(p0, state, 30_000)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(final), strict=True):
        np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name", list(CASES))
def test_inject_hyperparams_gives_the_same_updates_and_state(name):
    (u, state), (u_inj, state_inj), _, _ = _ten_steps(name)[2]
    want = jax.eval_shape(_opt(name).init, _INJECT_PARAMS)
    got = jax.eval_shape(_injected(name).init, _INJECT_PARAMS).inner_state
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert jax.tree.leaves(got) == jax.tree.leaves(want)  # shapes and dtypes
    assert jax.tree.structure(state_inj.inner_state) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(u_inj), jax.tree.leaves(u), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state_inj.inner_state), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_accumulation_first_mini_step_is_zero(name):
    multi = _ten_steps(name)[2][2]
    for updates, dtype in zip(multi, (jnp.bfloat16, jnp.float32), strict=True):
        assert updates.dtype == dtype
        np.testing.assert_array_equal(updates, np.zeros(2, dtype))


@pytest.mark.parametrize("name", list(CASES))
def test_learning_rate_annotated_as_optax_schedule(name):
    lr = inspect.signature(CASES[name].factory).parameters["learning_rate"]
    assert lr.annotation is optax.ScalarOrSchedule


@pytest.mark.parametrize("name", list(CASES))
def test_constant_schedule_equals_the_number(name):
    with_number, _, (_, _, _, with_schedule) = _ten_steps(name)
    for a, b in zip(jax.tree.leaves(with_schedule), jax.tree.leaves(with_number), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


# 4. dtypes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", list(CASES))
def test_dtype_preserved_and_state_dtype_stable(name, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        case = CASES[name]
        opt = case.factory(**case.kwargs)
        params, _, objective = optax_common._setup_parabola(dtype)
        assert params.dtype == dtype  # float64 really is on

        def step(params, state):
            updates = jax.grad(objective)(params)
            cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
            updates, state = jax.lax.cond(cond, lambda: opt.update(updates, state, params),
                                          lambda: (params, state))
            return optax.apply_updates(params, updates), state

        def two_steps(params, state):
            new_updates, _ = opt.update(jax.grad(objective)(params), state, params)
            assert new_updates.dtype == dtype
            for _ in range(2):
                params, new_state = step(params, state)
                assert params.dtype == dtype
                cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
                state = jax.lax.cond(cond, lambda s=state: s, lambda s=new_state: s)
            return params, state

        jax.eval_shape(two_steps, params, opt.init(params))
