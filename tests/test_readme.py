"""The README's examples run as written, and what they print is what the formats say.

Every ```python block of README.md is executed with ``exec``, in order, each in a fresh
namespace (the blocks are self-contained). Beyond "it runs", the values the blocks compute are
checked against figures derived here independently of effjax:

* the optimizer block: the state bytes per parameter of ``adamw_8bit`` from the format alone
  (two uint8 moments per element plus one float32 scale per 256-element block and moment for
  leaves of at least 4096 elements; two float32 moments for smaller leaves; one int32 step
  count), and the first AdamW step (update ``-lr`` everywhere, from the float32 moments);
* the PEFT block: the LoRA trainable count ``rank * (in + out)`` per kernel, and the merged
  kernels equal the initial kernels plus ``(alpha / rank) a @ b`` exactly, with the biases and
  the plain model's outputs unchanged by anything else.
"""

import contextlib
import io
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text("utf-8"), re.M | re.S)


def _run(source: str) -> tuple[dict, str]:
    namespace = {"__name__": "__readme__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, str(README), "exec"), namespace)
    return namespace, out.getvalue()


@pytest.fixture(scope="module")
def runs():
    """Each block run once, in README order, in a fresh namespace: {block: (namespace, stdout)}."""
    return {block: _run(block) for block in BLOCKS}


def _block(runs, marker: str) -> tuple[dict, str]:
    found = [r for b, r in runs.items() if marker in b]
    assert len(found) == 1, f"expected one README python block containing {marker!r}"
    return found[0]


def _value(variable):
    """The value inside an NNX Variable (``get_value`` where Flax has it)."""
    return variable.get_value() if hasattr(variable, "get_value") else variable.value


def test_every_block_runs(runs):
    assert len(BLOCKS) >= 2 and len(runs) == len(BLOCKS)


def test_optimizer_example_bytes_per_param_from_the_format(runs):
    ns, out = _block(runs, "state_bytes(")
    shapes = {"w": (1024, 1024), "b": (1024,)}  # the README's tree
    assert {k: v.shape for k, v in ns["params"].items()} == shapes
    n, expected = 0, 4  # one int32 step count
    for shape in shapes.values():
        size = math.prod(shape)
        n += size
        if size >= 4096:  # whole rows of 4 blocks of 256: no short blocks
            expected += 2 * size + 2 * 4 * math.ceil(size / 256)
        else:
            expected += 2 * 4 * size
    assert expected == 2_138_116
    assert out.strip() == f"{expected / n:.3f} bytes of state per parameter"
    assert "2.037" in out

    # The state holds exactly that: uint8 codes, float32 scales and small moments, one count.
    by_dtype = {}
    for leaf in jax.tree.leaves(ns["state"]):
        by_dtype[np.dtype(leaf.dtype)] = by_dtype.get(np.dtype(leaf.dtype), 0) + leaf.size
    assert by_dtype[np.dtype(np.uint8)] == 2 * 1024 * 1024
    assert by_dtype[np.dtype(np.float32)] == 2 * 4096 + 2 * 1024
    assert sum(v for k, v in by_dtype.items() if k not in (np.uint8, np.float32)) == 1

    # First AdamW step from zero params with unit gradients: m_hat = v_hat = 1, so the update
    # is -lr / (1 + eps) everywhere (from the float32 moments, before they are requantized),
    # the same as optax.adamw's float32 step up to float32 rounding.
    zeros = {k: jnp.zeros(v) for k, v in shapes.items()}
    ones = jax.tree.map(jnp.ones_like, zeros)
    ref, _ = optax.adamw(1e-3).update(ones, optax.adamw(1e-3).init(zeros), zeros)
    for k in shapes:
        np.testing.assert_allclose(np.asarray(ns["params"][k]), -1e-3, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(ns["params"][k]), np.asarray(ref[k]), rtol=1e-5)


def test_peft_example_trains_lora_and_merges_back(runs):
    ns, out = _block(runs, "print(summary(tree))")
    rank, alpha = 2, 4.0  # the README's rule: LoRA(rank=2, alpha=4.0) on every kernel
    params, tree, tuned = ns["params"], ns["tree"], ns["tuned"]
    layers = [(0, (8, 16)), (1, (16, 2))]  # MLP((8, 16, 2))

    # Trainable count: rank * (in + out) per adapted kernel; the total adds the frozen params.
    trainable = sum(rank * (i + o) for _, (i, o) in layers)
    dense = sum(i * o + o for _, (i, o) in layers)
    summ = ns["summary"](tree)
    assert (summ.trainable, summ.total) == (trainable, dense + trainable) == (84, 262)
    assert f"trainable params: {trainable}" in out and f"all params: {dense + trainable}" in out

    merged = nnx.state(tuned, nnx.Param)  # the plain model's params after merge(...)

    def arr(state, i, name):
        return np.asarray(_value(state["layers"][i][name]))

    for i, (d_in, d_out) in layers:
        w0 = arr(params, i, "kernel")
        node = _value(tree["layers"][i]["kernel"])
        a, b = np.asarray(node.a), np.asarray(node.b)
        assert a.shape == (d_in, rank) and b.shape == (rank, d_out)
        assert np.abs(b).max() > 1e-3  # the optax step moved b away from its zero init
        np.testing.assert_array_equal(np.asarray(node.w), w0)  # the base stayed frozen
        w1 = arr(merged, i, "kernel")
        assert w1.shape == w0.shape and np.abs(w1 - w0).max() > 1e-4
        np.testing.assert_allclose(w1 - w0, (alpha / rank) * (a @ b), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(arr(merged, i, "bias"), arr(params, i, "bias"))

    # The merged model is a plain MLP: the dense forward pass with W + (alpha / rank) a b.
    x = np.asarray(ns["x"])
    h = np.asarray(jax.nn.gelu(jnp.asarray(x @ arr(merged, 0, "kernel") + arr(merged, 0, "bias"))))
    y = h @ arr(merged, 1, "kernel") + arr(merged, 1, "bias")
    np.testing.assert_allclose(np.asarray(tuned(ns["x"])), y, rtol=1e-5, atol=1e-5)


def test_qlora_example_quantizes_trains_adapters_and_merges(runs):
    ns, out = _block(runs, "quantize_params(")
    n_in, n_out, rank, alpha = 256, 128, 4, 8.0  # MLP((256, 128, 2)), LoRA(rank=4, alpha=8.0)
    n = n_in * n_out
    blocks = n // 64
    # NF4 + double quant: 4-bit codes, one uint8 per block scale, one float32 maximum per 256
    # scales, one float32 offset
    nbytes = n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4
    assert f"{8 * nbytes / n:10.3f}" in out and "nf4 b64 +dq" in out
    assert f"{8 * nbytes / n:.3f}" == "4.128"
    node = _value(ns["tree"]["layers"][0]["kernel"])
    assert node.w.nbytes == nbytes
    a, b = np.asarray(node.a), np.asarray(node.b)
    assert a.shape == (n_in, rank) and b.shape == (rank, n_out) and np.abs(b).max() > 1e-5
    # the export: the dequantized base (NF4 codes times the block scales) plus (alpha/rank) a b
    from effjax.quant import weights as wq
    codes = np.asarray(node.w.codes).ravel()
    q = np.stack([codes >> 4, codes & 15], axis=-1).ravel()
    scales = np.asarray(node.w.block_scales()).ravel()
    w_deq = (wq.four_bit_table("nf4")[q] * np.repeat(scales, 64)).reshape(n_out, n_in).T
    merged = np.asarray(_value(ns["dense"]["layers"][0]["kernel"]))
    np.testing.assert_allclose(merged, w_deq + (alpha / rank) * (a @ b), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(_value(ns["dense"]["layers"][1]["kernel"])),
                                  np.asarray(_value(ns["tree"]["layers"][1]["kernel"])))
