"""Codebooks against bitsandbytes / torchao values and their defining properties."""

import bitsandbytes.functional as bnbf  # noqa: E402  (peer library, in the test extra)
import numpy as np
import pytest

from effjax.quant import (
    adam4bit_first_moment_codebook,
    adam4bit_second_moment_codebook,
    dynamic_codebook,
    fp4_codebook,
    linear_codebook,
    nf4_codebook,
)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_equals_bitsandbytes(signed):
    ref = bnbf.create_dynamic_map(signed).numpy()
    ours = dynamic_codebook(signed=signed, bits=8)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("name,fn", [("nf4", nf4_codebook), ("fp4", fp4_codebook)])
def test_4bit_types_equal_bitsandbytes(name, fn):
    np.testing.assert_array_equal(fn(), bnbf.get_4bit_type(name, "cpu").numpy())


def test_torchao_4bit_maps():
    import torchao.optim.subclass_4bit as sub
    np.testing.assert_array_equal(adam4bit_first_moment_codebook(),
                                  np.array(sub.get_qmap_signed(), np.float32))
    np.testing.assert_array_equal(adam4bit_second_moment_codebook(),
                                  np.array(sub.get_qmap_unsigned(), np.float32))


@pytest.mark.parametrize("signed,bits", [(True, 8), (False, 8), (True, 4), (False, 4)])
def test_dynamic_structure(signed, bits):
    cb = dynamic_codebook(signed=signed, bits=bits)
    assert cb.shape == (2**bits,)
    assert np.all(np.diff(cb) > 0), "sorted and distinct"
    assert cb.max() == 1.0 and 0.0 in cb
    assert (cb.min() < 0) == signed


@pytest.mark.parametrize("bits,signed", [(2, False), (4, True), (8, True), (8, False)])
def test_linear(bits, signed):
    cb = linear_codebook(bits, signed=signed)
    np.testing.assert_allclose(cb, np.linspace(-1 if signed else 0, 1, 2**bits), atol=1e-7)


@pytest.mark.parametrize("bad", [0, 1, 9, 16])
def test_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        dynamic_codebook(bits=bad)


@pytest.mark.parametrize("signed", [True, False])
def test_every_dynamic_code_round_trips_bit_exactly(signed):
    # The 8-bit dynamic maps are decoded and searched by their closed form (no table); each
    # code value must come back bit for bit and every value must find its own code.
    import jax.numpy as jnp

    from effjax.quant import dequantize_blockwise, quantize_blockwise

    cb = dynamic_codebook(signed=signed)
    q = quantize_blockwise(jnp.asarray(cb), codebook=cb, block_size=256)
    assert float(q.absmax[0]) == 1.0
    np.testing.assert_array_equal(np.asarray(q.codes), np.arange(256))
    np.testing.assert_array_equal(np.asarray(dequantize_blockwise(q)), cb)
