"""effjax.compress LoftQ and LQ-LoRA.

LoftQ against PEFT's own ``loftq_init`` run on CPU (its source with the one compute-device
string set to "cpu"; bitsandbytes' NF4 quantizes the torch weight ``W.T``): the quantized bytes
equal, the factors equal up to SVD signs. LQ-LoRA against a plain transcription of the official
``lowrank_quantized_sparse_decomposition`` (torch SVD, bitsandbytes NF4). The allocation against
brute-force enumeration. Properties: the residual shrinks, the alpha != rank rule, bad inputs.
"""

import inspect
import itertools
import math

import bitsandbytes
import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import numpy as np
import peft.utils.loftq_utils as peft_loftq_utils
import pytest
import torch

from effjax.compress import (
    NF4,
    Int4,
    Int8,
    loftq_init,
    lq_lora_allocate,
    lq_lora_decompose,
    quantize_params,
)

FMT = NF4(double_quant=False)  # PEFT's LoftQ: Params4bit(quant_type="nf4", no double quant)
SHAPE = (64, 48)  # a Flax kernel (in, out): torch weight (48, 64), one NF4 block per row


# one compiled program per (shape, format) instead of eager op-by-op dequantization
_dense = jax.jit(lambda node: node.materialize())


def _kernel(seed, shape=SHAPE, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


@pytest.fixture(scope="module")
def peft_loftq():
    """PEFT's ``loftq_init`` itself, with ``compute_device = "cuda"`` set to "cpu" (the only
    change: bitsandbytes 0.50 quantizes and dequantizes NF4 on CPU)."""
    src = inspect.getsource(peft_loftq_utils.loftq_init)
    assert src.count('"cuda"') == 1
    namespace = dict(vars(peft_loftq_utils))
    exec(compile(src.replace('"cuda"', '"cpu"'), peft_loftq_utils.__file__, "exec"), namespace)
    return namespace["loftq_init"]


def _run_peft(peft_loftq, w, rank, iters, monkeypatch):
    """PEFT's ``(Q, lora_A, lora_B)`` for the torch weight ``w.T``, and the packed bytes and
    block absmax bitsandbytes produced for the returned ``Q`` (its last dequantize call)."""
    seen = []
    dequantize = bitsandbytes.functional.dequantize_4bit

    def record(packed, state, *args, **kwargs):
        seen.append((packed.numpy().copy(), state.absmax.numpy().copy()))
        return dequantize(packed, state, *args, **kwargs)

    monkeypatch.setattr(bitsandbytes.functional, "dequantize_4bit", record)
    q, lora_a, lora_b = peft_loftq(torch.from_numpy(w.T.copy()), 4, rank, num_iter=iters)
    assert len(seen) == iters
    return q.numpy(), lora_a.numpy(), lora_b.numpy(), seen[-1]


@pytest.mark.peer
@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_equals_peft_loftq_init(peft_loftq, monkeypatch, iters):
    w, rank = _kernel(0), 4
    q_ref, lora_a, lora_b, (packed, absmax) = _run_peft(peft_loftq, w, rank, iters, monkeypatch)
    q, a, b = loftq_init(jnp.asarray(w), FMT, rank=rank, iters=iters)
    # the base: bitsandbytes' bytes of the same residual
    np.testing.assert_array_equal(np.asarray(q.codes).ravel(), packed.ravel())
    if iters == 1:  # Q_1 = quant(W): identical inputs, identical float32 scales and values
        np.testing.assert_array_equal(np.asarray(q.scales).ravel(), absmax)
        np.testing.assert_array_equal(np.asarray(_dense(q)), q_ref.T)
    else:  # the residual W - L R went through another SVD and matmul (LAPACK via jnp vs
        # torch): its block maxima agree to float32 rounding, a few ulps
        np.testing.assert_allclose(np.asarray(q.scales).ravel(), absmax, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(_dense(q)), q_ref.T, rtol=1e-6, atol=1e-6)
    # the factors: a = lora_A.T, b = lora_B.T up to the sign of each singular pair
    a, b = np.asarray(a), np.asarray(b)
    sign = np.sign(np.sum(a * lora_a.T, axis=0))
    assert np.all(sign != 0)
    # float32 SVDs by two LAPACK builds differ by ~eps * ||W|| / (singular-value gap); the
    # factors have entries ~0.3, observed differences < 1e-5
    np.testing.assert_allclose(a * sign, lora_a.T, atol=5e-5)
    np.testing.assert_allclose(b * sign[:, None], lora_b.T, atol=5e-5)
    np.testing.assert_allclose(a @ b, (lora_b @ lora_a).T, atol=1e-5)


def test_loftq_residual_is_below_the_quantization_error_and_shrinks_with_iters():
    w = jnp.asarray(_kernel(1))
    errors = []
    for iters in (1, 2, 3, 5):
        q, a, b = loftq_init(w, FMT, rank=4, iters=iters)
        if iters == 1:  # Q_1 = quant(W): the plain quantization error
            np.testing.assert_array_equal(
                np.asarray(q.codes), np.asarray(quantize_params({"w": w}, {"w": FMT})["w"].codes))
            plain = float(jnp.linalg.norm(w - _dense(q)))
        errors.append(float(jnp.linalg.norm(w - _dense(q) - a @ b)))
    assert errors[0] < 0.95 * plain
    assert all(e1 <= e0 for e0, e1 in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]


def test_loftq_alpha_divides_each_factor_by_sqrt_scale(peft_loftq, monkeypatch):
    w, rank = _kernel(2, (64, 48)), 4
    q1, a1, b1 = loftq_init(jnp.asarray(w), FMT, rank=rank, iters=2)  # s = 1: PEFT's factors
    for alpha, rslora in ((16.0, False), (6.0, True), (1.0, False)):
        s = alpha / (math.sqrt(rank) if rslora else rank)
        q, a, b = loftq_init(jnp.asarray(w), FMT, rank=rank, iters=2, alpha=alpha,
                             rslora=rslora)
        np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(q1.codes))  # no s in Q
        np.testing.assert_array_equal(np.asarray(a), np.asarray(a1 / math.sqrt(s)))
        np.testing.assert_array_equal(np.asarray(b), np.asarray(b1 / math.sqrt(s)))
        np.testing.assert_allclose(np.asarray(s * (a @ b)), np.asarray(a1 @ b1), atol=1e-6)
    # PEFT keeps the s = 1 factors under the scale alpha / r = 4: its LoRA model starts from
    # Q + 4 L R', far from W; effjax's factors at alpha = 16 give LoftQ's approximation
    _, a16, b16 = loftq_init(jnp.asarray(w), FMT, rank=rank, iters=2, alpha=16.0)
    q_ref, lora_a, lora_b, _ = _run_peft(peft_loftq, w, rank, 2, monkeypatch)
    target = w.T - q_ref  # the torch weight minus PEFT's base
    loftq_err = np.linalg.norm(target - lora_b @ lora_a)
    ours = np.linalg.norm(target - 4.0 * np.asarray(a16 @ b16).T)
    peft_err = np.linalg.norm(target - 4.0 * lora_b @ lora_a)
    assert abs(ours - loftq_err) < 1e-4 * loftq_err
    assert peft_err > 1.5 * loftq_err


def test_loftq_kernel_layouts_and_dtype():
    w = jnp.asarray(_kernel(3, (2,) + SHAPE)).astype(jnp.bfloat16)  # stacked layers
    fmt = NF4(double_quant=False, batch_axes=(0,))  # (double quantization mixes the layers)
    q, a, b = loftq_init(w, fmt, rank=4)
    assert a.shape == (2, 64, 4) and b.shape == (2, 4, 48) and a.dtype == jnp.float32
    assert _dense(q).dtype == jnp.bfloat16
    for i in range(2):  # each layer is its own LoftQ problem
        qi, ai, bi = loftq_init(w[i], FMT, rank=4)
        np.testing.assert_array_equal(np.asarray(q.codes[i * 48:(i + 1) * 48]),
                                      np.asarray(qi.codes))
        np.testing.assert_allclose(np.asarray(a[i] @ b[i]), np.asarray(ai @ bi), atol=1e-5)


# ----------------------------------------------------------------------------- LQ-LoRA


def _official_lq(wt, rank, iters):
    """The official ``lowrank_quantized_sparse_decomposition`` (exact SVD, NF4 via
    bitsandbytes on the torch weight ``wt``): the list of errors it computes."""
    q, last, errors = np.zeros_like(wt), np.inf, []
    for _ in range(iters):
        u, s, vh = (x.numpy() for x in torch.linalg.svd(torch.from_numpy(wt - q),
                                                         full_matrices=False))
        l1 = (u * np.sqrt(s)[None, :])[:, :rank]
        l2 = (vh * np.sqrt(s)[:, None])[:rank]
        packed, state = bnbf.quantize_4bit(torch.from_numpy(np.ascontiguousarray(wt - l1 @ l2)),
                                           blocksize=64, compress_statistics=False,
                                           quant_type="nf4")
        q = bnbf.dequantize_4bit(packed, state).numpy()
        errors.append(float(np.linalg.norm(wt - l1 @ l2 - q)))
        if errors[-1] > last:
            break
        last = errors[-1]
    return errors


@pytest.mark.peer
def test_lq_lora_errors_equal_the_official_loop_and_stop_when_they_rise():
    w = _kernel(1)
    q, a, b, errors = lq_lora_decompose(jnp.asarray(w), FMT, rank=4, iters=30)
    ref = _official_lq(w.T.copy(), 4, 30)
    assert len(errors) == len(ref) < 30  # stopped by a rise, at the same iteration
    np.testing.assert_allclose(errors, ref, rtol=1e-5)  # float32 SVD/matmul rounding
    assert errors[-1] > errors[-2]
    assert all(e1 <= e0 for e0, e1 in zip(errors[:-1], errors[1:-1]))
    # the best iterate is returned (the official code returns the one that rose)
    err = float(jnp.linalg.norm(jnp.asarray(w) - _dense(q) - a @ b))
    assert abs(err - min(errors)) < 1e-4 * err
    assert min(errors) < math.sqrt(_bnb_cost(w, FMT)[0])  # below the plain quantization error


def test_lq_lora_scale_and_iteration_cap():
    w = jnp.asarray(_kernel(1))
    q1, a1, b1, e1 = lq_lora_decompose(w, FMT, rank=4, iters=3)
    assert len(e1) == 3 and e1[0] > e1[1] > e1[2]  # capped before any rise
    q, a, b, e = lq_lora_decompose(w, FMT, rank=4, iters=3, alpha=16.0)  # s = 4
    assert e == e1
    np.testing.assert_array_equal(np.asarray(a), np.asarray(a1 / 2))
    np.testing.assert_array_equal(np.asarray(b), np.asarray(b1 / 2))


CANDIDATES = [NF4(block_size=64, double_quant=True), NF4(block_size=32, double_quant=False),
              Int8()]


@pytest.fixture(scope="module")
def three():
    # one shape (one compiled program per format), three distributions: the errors differ
    return {"attn/q": _kernel(4),
            "mlp/up": _kernel(5, scale=0.5),
            "mlp/down": np.random.default_rng(6).standard_t(3, SHAPE).astype(np.float32)}


def _bnb_cost(w, fmt):
    """bitsandbytes' squared error and stored bytes for the torch weight ``w.T``."""
    t = torch.from_numpy(np.ascontiguousarray(w.T))
    if isinstance(fmt, Int8):
        codes, stats, _ = bnbf.int8_vectorwise_quant(t)
        deq, stored = bnbf.int8_vectorwise_dequant(codes, stats), [codes, stats]
    else:
        codes, state = bnbf.quantize_4bit(t, blocksize=fmt.block_size, quant_type=fmt.kind,
                                          compress_statistics=fmt.double_quant)
        deq, stored = bnbf.dequantize_4bit(codes, state), [codes, state.absmax]
        if fmt.double_quant:
            stored += [state.state2.absmax, state.offset]
    nbytes = sum(x.numel() * x.element_size() for x in stored)
    return float(np.linalg.norm(w.T - deq.numpy())) ** 2, nbytes


def _brute_force(weights, candidates, budget, rank=None):
    """The best feasible assignment by enumeration, and the table of (cost, bytes)."""
    table = {}
    for path, w in weights.items():
        for j, fmt in enumerate(candidates):
            if rank is None:
                table[path, j] = _bnb_cost(w, fmt)
            else:
                node, _, _, errors = lq_lora_decompose(jnp.asarray(w), fmt, rank=rank, iters=4)
                table[path, j] = (min(errors) ** 2, _bnb_cost(w, fmt)[1])
    best = None
    for choice in itertools.product(range(len(candidates)), repeat=len(weights)):
        cost = sum(table[p, j][0] for p, j in zip(weights, choice))
        size = sum(table[p, j][1] for p, j in zip(weights, choice))
        if size <= budget and (best is None or cost < best[0]):
            best = (cost, choice)
    return (best and {p: candidates[j] for p, j in zip(weights, best[1])}), table


def test_allocation_equals_brute_force_and_respects_the_budget(three):
    n = sum(w.size for w in three.values())
    _, table = _brute_force(three, CANDIDATES, 0)
    # the memory of each choice is the bytes bitsandbytes stores
    for (path, j), (_, nbytes) in table.items():
        assert quantize_params({"w": jnp.asarray(three[path])},
                               {"w": CANDIDATES[j]})["w"].nbytes == nbytes, (path, j)
    sizes = [sum(table[p, j][1] for p in three) for j in range(len(CANDIDATES))]
    lo, hi = min(sizes), max(sizes)
    for frac in (0.1, 0.5, 0.8):
        budget = lo + frac * (hi - lo)
        got = lq_lora_allocate(three, CANDIDATES, budget_bytes=budget)
        want, _ = _brute_force(three, CANDIDATES, budget)
        assert got == want, frac
        assert len(set(got.values())) > 1  # a mixed assignment, not a trivial one
        assert sum(table[p, CANDIDATES.index(f)][1] for p, f in got.items()) <= budget
    # the same budget in bits per parameter
    bits = 8 * (lo + 0.5 * (hi - lo)) / n
    assert lq_lora_allocate(three, CANDIDATES, budget_bits_per_param=bits) == \
        _brute_force(three, CANDIDATES, bits * n / 8)[0]
    # enough bytes for everything: every matrix gets its smallest error
    assert set(lq_lora_allocate(three, CANDIDATES, budget_bytes=hi).values()) == {Int8()}


def test_allocation_with_lq_lora_errors_equals_brute_force(three):
    two = {k: three[k] for k in ("attn/q", "mlp/down")}  # the LQ-LoRA test's shape
    cands = [NF4(double_quant=False), Int8()]
    budget = 0.5 * sum(_bnb_cost(w, f)[1] for w in two.values() for f in cands)
    got = lq_lora_allocate(two, cands, budget_bytes=budget, rank=4, iters=4)
    assert got == _brute_force(two, cands, budget, rank=4)[0]


def test_allocation_gives_more_bits_to_the_larger_error():
    w = _kernel(7)
    for order in ((0.1, 1.0), (1.0, 0.1)):
        weights = {f"layer{i}": w * s for i, s in enumerate(order)}
        got = lq_lora_allocate(weights, [NF4(), Int8()], budget_bits_per_param=6.5)
        big = f"layer{order.index(1.0)}"
        small = f"layer{order.index(0.1)}"
        assert got[big] == Int8() and got[small] == NF4(), got


def test_allocation_leaves_out_formats_a_matrix_cannot_take():
    weights = {"wide": _kernel(8), "narrow": _kernel(9, (32, 16))}  # K = 64, 32
    cands = [CANDIDATES[0], Int8()]
    got = lq_lora_allocate(weights, cands, budget_bits_per_param=7.0)
    assert got["narrow"] == Int8()  # a block of 64 does not fit K = 32
    assert got["wide"] == cands[0]
    with pytest.raises(ValueError, match=r"'narrow' \(shape \(32, 16\)\): no candidate"):
        lq_lora_allocate(weights, [Int4(group_size=64)], budget_bits_per_param=8.0)


def test_bad_inputs():
    w = jnp.asarray(_kernel(0))
    with pytest.raises(ValueError, match=r"rank=49 exceeds min\(n_in, n_out\) = 48 of the "
                                         r"kernel of shape \(64, 48\)"):
        loftq_init(w, FMT, rank=49)
    with pytest.raises(ValueError, match=r"lq_lora_decompose: rank=64 exceeds"):
        lq_lora_decompose(w, FMT, rank=64)
    with pytest.raises(ValueError, match="rank must be an int >= 1, got 0"):
        loftq_init(w, FMT, rank=0)
    with pytest.raises(ValueError, match="iters must be an int >= 1, got 0"):
        loftq_init(w, FMT, rank=2, iters=0)
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        loftq_init(w, FMT, rank=2, alpha=-1.0)
    with pytest.raises(TypeError, match="floating kernel, got dtype int32"):
        loftq_init(jnp.ones((64, 8), jnp.int32), FMT, rank=2)
    with pytest.raises(TypeError, match="fmt must be a WeightFormat"):
        loftq_init(w, "nf4", rank=2)
    with pytest.raises(ValueError, match="1 non-finite value"):
        loftq_init(w.at[0, 0].set(jnp.nan), FMT, rank=2)
    with pytest.raises(ValueError, match="block of 128 is longer than"):
        loftq_init(jnp.ones((64, 8)), NF4(block_size=128), rank=2)
    weights = {"a": np.asarray(w), "b": np.asarray(w)}
    cheapest = 2 * quantize_params({"w": w}, {"w": FMT})["w"].nbytes  # 2 x 1728
    with pytest.raises(ValueError, match=rf"budget of 3000 bytes \(3.906 bits per parameter\) "
                                         rf"is below the minimum {cheapest} bytes \(4.5 bits"):
        lq_lora_allocate(weights, [FMT, Int8()], budget_bytes=3000)
    with pytest.raises(ValueError, match="exactly one of budget_bits_per_param and budget_b"):
        lq_lora_allocate(weights, [FMT], budget_bytes=1e6, budget_bits_per_param=4.0)
    with pytest.raises(ValueError, match="exactly one"):
        lq_lora_allocate(weights, [FMT])
    with pytest.raises(ValueError, match="at least one candidate"):
        lq_lora_allocate(weights, [], budget_bytes=1e6)
    with pytest.raises(ValueError, match="'b': 1 non-finite"):
        lq_lora_allocate({"b": np.asarray(w.at[1, 1].set(jnp.inf))}, [FMT], budget_bytes=1e6)
    with pytest.raises(ValueError, match="rank=49 exceeds"):
        lq_lora_allocate(weights, [FMT], budget_bytes=1e6, rank=49)
