"""Bad inputs to effjax.peft give a clear error (issue 19, "every bad input").

The cases ``experiments/fuzz_api.py`` found: a zero-size kernel (was a bare
``ZeroDivisionError``), a method class instead of an instance (was "got ABCMeta"), rules given
as a list of strings (the message did not show them), a rank far above the kernel's sides (was
an out-of-memory crash), and their siblings in every LoRA-family method. Each error must be a
``ValueError`` / ``TypeError`` whose message names the leaf path or argument and the bad
value, shape or dtype, and says what to pass instead. The bounds are written here from the
rules documented in ``effjax.peft._checks`` (``rank <= max(n_in, n_out)`` for trainable
factors; frozen random arrays of at most ``max(64 n_in n_out, 2**24)`` elements), not read
from the code under test. Every error is raised before anything is allocated or compiled.
"""

import jax
import jax.numpy as jnp
import pytest

import effjax.peft as peft
from effjax.peft import (
    NOLA,
    DoRA,
    LoRA,
    MoS,
    RandLoRA,
    Unfreeze,
    VeRA,
    inject,
    method_to_config,
)
from effjax.peft.base import KernelAdapter

KEY = jax.random.key(0)
BIG = 10**9


def _params(kernel=None):
    return {"dense": {"kernel": jnp.ones((8, 4)) if kernel is None else kernel,
                      "bias": jnp.zeros(4)},
            "out": {"kernel": jnp.ones((4, 2))}}


def _raises(err, call, *needles):
    """``call()`` raises exactly ``err`` and its message contains every needle."""
    with pytest.raises(Exception) as info:
        call()
    assert type(info.value) is err, f"{type(info.value).__name__}: {info.value}"
    msg = str(info.value)
    for n in needles:
        assert n in msg, f"{n!r} not in: {msg}"
    return msg


# ----------------------------------------------------------------- zero-size kernels

def _shipped_methods():
    """An instance of every kernel method effjax.peft exports (defaults where they exist)."""
    extra = {"LoRASB": {"lr": 0.1}}
    out = []
    for name in peft.__all__:
        cls = getattr(peft, name)
        if isinstance(cls, type) and issubclass(cls, KernelAdapter) and cls is not KernelAdapter:
            out.append(cls(**extra.get(name, {})))
    return out


METHODS = _shipped_methods()


def test_every_shipped_kernel_method_is_covered():
    names = {type(m).__name__ for m in METHODS}
    assert {"LoRA", "DoRA", "VeRA", "NOLA", "RandLoRA", "MoS", "LoRAXS", "LoRASB", "EVA",
            "CorDA", "LaMDA", "LoLDU", "SVFit", "MiSS", "WeLore"} <= names


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("shape", [(0, 4), (8, 0)])
def test_zero_size_kernel_is_a_clear_error(method, shape):
    # the calibration entry is never read: the kernel is refused first
    calib = {"dense/kernel": None} if method.calibration else None
    _raises(ValueError, lambda: inject(_params(jnp.ones(shape)), {"dense/kernel": method},
                                       key=KEY, calibration=calib),
            "leaf 'dense/kernel'", f"shape {shape}", "zero-size", "None rule")


def test_zero_size_stack_of_kernels_is_a_clear_error():
    _raises(ValueError, lambda: inject({"k": jnp.ones((0, 8, 4))},
                                       {"k": LoRA(rank=2, batch_axes=0)}, key=KEY),
            "leaf 'k'", "(0, 8, 4)", "zero-size")


@pytest.mark.parametrize("method", [LoRA(rank=2), VeRA(rank=2)], ids=lambda m: m.name)
def test_one_d_leaf_names_the_method_that_needs_two_axes(method):
    _raises(ValueError, lambda: inject(_params(), {"dense/bias": method}, key=KEY),
            "leaf 'dense/bias'", "shape (4,)", f"{method.name} needs at least 2 (in and out)",
            "target only kernels")


# ----------------------------------------------------------------- ranks far too large

def _budget(n_in, n_out):
    return max(64 * n_in * n_out, 2**24)


# (method, field, largest accepted value on the (8, 4) kernel: n_in = 8, n_out = 4)
LIMITS = [
    (LoRA(rank=BIG), "rank", 8),  # max(n_in, n_out)
    (LoRA(rank=BIG, init="gaussian"), "rank", 8),
    (DoRA(rank=BIG), "rank", 8),
    (NOLA(rank=BIG), "rank", 8),
    (MoS(rank=BIG, pool_rank=2), "rank", 8),
    (MoS(rank=2, pool_rank=BIG), "pool_rank", 8),
    (VeRA(rank=BIG), "rank", _budget(8, 4) // (8 + 4)),  # A (n_in, r), B (r, n_out)
    (RandLoRA(rank=BIG), "rank", _budget(8, 4) // (8 + 4)),
    (NOLA(rank=2, num_basis_a=BIG), "num_basis_a", _budget(8, 4) // (8 * 2)),  # A_i (n_in, r)
    (NOLA(rank=2, num_basis_b=BIG), "num_basis_b", _budget(8, 4) // (2 * 4)),  # B_j (r, n_out)
]


@pytest.mark.parametrize("method,field,limit", LIMITS,
                         ids=[f"{type(m).__name__}-{f}" for m, f, _ in LIMITS])
def test_size_field_far_above_the_kernel_is_a_clear_error(method, field, limit):
    _raises(ValueError, lambda: inject(_params(), {"dense/kernel": method}, key=KEY),
            "leaf 'dense/kernel'", "(8, 4)", f"{field}={BIG}", f"pass {field} <= {limit}")


def test_rank_bound_is_max_of_the_sides_for_lora():
    tree = inject(_params(), {"dense/kernel": LoRA(rank=8)}, key=KEY)  # r > min is accepted
    assert tree["dense"]["kernel"].a.shape == (8, 8)
    assert tree["dense"]["kernel"].b.shape == (8, 4)
    _raises(ValueError, lambda: inject(_params(), {"dense/kernel": LoRA(rank=9)}, key=KEY),
            "LoRA rank=9", "max(n_in, n_out) = 8", "pass rank <= 8")


def test_default_random_feature_ranks_stay_valid_on_small_kernels():
    # VeRA's default r = 256 and RandLoRA's r = 32 exceed the (8, 4) kernel's sides; their
    # frozen arrays (256 * 12 and 32 * 12 elements) are far inside the budget
    # (shapes only: jax.eval_shape runs the checks and builds no array)
    kernel = jax.ShapeDtypeStruct((8, 4), jnp.float32)
    node = jax.eval_shape(VeRA().adapt, KEY, kernel)
    assert node.a.shape == (8, 256) and node.b.shape == (256, 4)
    assert jax.eval_shape(RandLoRA().adapt, KEY, kernel).a.shape == (32, 4)


# ----------------------------------------------------------------- rules and arguments

@pytest.mark.parametrize("cls,example", [(LoRA, "LoRA(rank=8)"), (Unfreeze, "Unfreeze()")])
def test_method_class_instead_of_instance(cls, example):
    _raises(TypeError, lambda: inject(_params(), {r".*/kernel": cls}, key=KEY),
            "rule '.*/kernel'", f"the class {cls.__name__}", f"pass an instance, e.g. {example}")
    _raises(TypeError, lambda: method_to_config(cls), f"the class {cls.__name__}", example)


def test_rules_as_a_list_of_strings_shows_them():
    _raises(TypeError, lambda: inject(_params(), ["dense/kernel"], key=KEY),
            "rules must be", "list", "item 0 is str 'dense/kernel'",
            "{'dense/kernel': LoRA(rank=8)}")


@pytest.mark.parametrize("value,shown", [("lora", "str 'lora'"), (4, "int 4"),
                                         (None, "NoneType None")])
def test_bad_rules_and_rule_values_show_the_value(value, shown):
    if value is None:  # rules=None itself
        call = lambda: inject(_params(), None, key=KEY)  # noqa: E731
        needles = ("rules must be", shown)
    else:
        call = lambda: inject(_params(), {"dense/kernel": value}, key=KEY)  # noqa: E731
        needles = ("rule 'dense/kernel'", "adapter method", shown)
    _raises(TypeError, call, *needles)


@pytest.mark.parametrize("key,shown", [(None, "NoneType None"), (0, "int 0"),
                                       ("key", "str 'key'")])
def test_bad_key_names_the_argument_and_value(key, shown):
    _raises(TypeError, lambda: inject(_params(), {"dense/kernel": LoRA(rank=2)}, key=key),
            "inject key must be a PRNG key", shown)


def test_raw_uint32_key_is_still_accepted():
    tree = inject(_params(), {"dense/kernel": LoRA(rank=2)}, key=jax.random.PRNGKey(0))
    assert tree["dense"]["kernel"].a.shape == (8, 2)
