"""effjax.compress.bnb_format against bitsandbytes 0.50's own ``Linear4bit`` on CPU: a state
dict bitsandbytes writes is read without dequantizing (bytes, scales, nested statistics equal;
``materialize`` equals bitsandbytes' dequantization), written back byte for byte (keys and the
packed JSON included), loaded by ``Params4bit.from_prequantized`` into a ``Linear4bit`` whose
forward equals ``x @ materialize``; whole trees round-trip through safetensors; mismatches
name the key or the leaf. NF4 and FP4, with and without double quantization, on an odd
shape whose blocks cross rows (in=100, out=7, block 64) and a bfloat16 weight."""

import json

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy as stn
import torch

from effjax.compress import (
    FP4,
    NF4,
    Int8,
    QuantizedWeight,
    from_bnb_state_dict,
    load_bnb_checkpoint,
    materialize,
    quantize_params,
    save_bnb_checkpoint,
    to_bnb_state_dict,
)
from effjax.quant import weights as wq

pytestmark = pytest.mark.peer

# (quant_type, double quant, in, out, block, torch dtype)
CASES = [("nf4", True, 100, 7, 64, torch.float32), ("nf4", False, 100, 7, 64, torch.float32),
         ("fp4", True, 100, 7, 64, torch.float32), ("fp4", False, 100, 7, 64, torch.float32),
         ("nf4", True, 128, 32, 32, torch.bfloat16)]
IDS = ["nf4-dq-odd", "nf4-odd", "fp4-dq-odd", "fp4-odd", "nf4-dq-bf16"]
_FMT = {"nf4": NF4, "fp4": FP4}


def _assert_dequantized_equal(ours, ref, double_quant, bf16=False):
    """Dequantized weights equal bitsandbytes'. Without double quantization exactly (table
    value times the same float32 scale). With it, a compiled program may be 1 ulp off in a
    block's scale: XLA:CPU contracts ``dyn[c] * nested_absmax + offset`` into one FMA (one
    rounding where bitsandbytes' torch code rounds twice): one float32 ulp of the scale
    (<= 2^-23 relative) plus each side's rounding of the product (<= 2^-24 each), under
    2^-21 relative (measured: 2.44e-7 = 1.02 * 2^-22); in bfloat16 that can flip the final
    rounding, one bfloat16 ulp, at most 2^-7 relative."""
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    if double_quant:
        np.testing.assert_allclose(ours, ref, rtol=2.0 ** -7 if bf16 else 2.0 ** -21, atol=0)
    else:
        np.testing.assert_array_equal(ours, ref)


def _torch_weight(n_in, n_out, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # rows of different scales, so the block scales spread and double quantization matters
    w = torch.randn(n_out, n_in, generator=g) * torch.rand(n_out, 1, generator=g) * 3
    return w.to(dtype), torch.randn(n_out, generator=g).to(dtype)


def _bnb_linear(kind, dq, n_in, n_out, block, dtype, seed):
    """A ``Linear4bit`` quantized on CPU from a known float weight, as its docstring shows:
    load the float state dict, then ``.to(device)`` quantizes (``Params4bit._quantize``)."""
    w, b = _torch_weight(n_in, n_out, dtype, seed)
    lin = bnb.nn.Linear4bit(n_in, n_out, bias=True, quant_type=kind, compress_statistics=dq)
    lin = lin.to(dtype)  # a dtype alone does not quantize
    lin.weight.blocksize = block
    lin.load_state_dict({"weight": w, "bias": b})
    assert not lin.weight.bnb_quantized and lin.weight.dtype == dtype
    lin = lin.to("cpu")
    assert lin.weight.bnb_quantized and lin.weight.dtype == torch.uint8
    assert lin.weight.quant_state.dtype == dtype
    return lin, w, b


def _np(sd):
    """The state dict as numpy arrays, biases left out (only the quantized weight matters)."""
    return {k: v.detach().numpy() for k, v in sd.items() if not k.endswith("bias")}


@pytest.fixture(scope="module", params=range(len(CASES)), ids=IDS)
def case(request):
    kind, dq, n_in, n_out, block, dtype = CASES[request.param]
    lin, w, b = _bnb_linear(kind, dq, n_in, n_out, block, dtype, seed=request.param)
    model = torch.nn.ModuleDict({"fc": lin})  # keys under the prefix "fc."
    sd = model.state_dict()
    node = from_bnb_state_dict(_np(sd), "fc.", shape=(n_in, n_out))
    return dict(kind=kind, dq=dq, n_in=n_in, n_out=n_out, block=block, dtype=dtype, lin=lin,
                w=w, b=b, sd=sd, node=node)


def test_bitsandbytes_writes_the_keys_effjax_reads(case):
    sd, kind = case["sd"], case["kind"]
    keys = ["fc.weight", "fc.bias", "fc.weight.absmax", "fc.weight.quant_map"]
    keys += ["fc.weight.nested_absmax", "fc.weight.nested_quant_map"] if case["dq"] else []
    assert list(sd) == keys + [f"fc.weight.quant_state.bitsandbytes__{kind}"]
    meta = json.loads(bytes(sd[f"fc.weight.quant_state.bitsandbytes__{kind}"].numpy()))
    assert meta["shape"] == [case["n_out"], case["n_in"]] and meta["blocksize"] == case["block"]
    n = case["n_in"] * case["n_out"]
    assert tuple(sd["fc.weight"].shape) == ((n + 1) // 2, 1)


def test_read_equals_bitsandbytes_bytes_and_dequantization(case):
    sd, node, lin = case["sd"], case["node"], case["lin"]
    assert isinstance(node, QuantizedWeight)
    assert node.format == _FMT[case["kind"]](block_size=case["block"], double_quant=case["dq"])
    assert node.shape == (case["n_in"], case["n_out"])
    assert node.dtype == jnp.dtype(str(case["dtype"]).removeprefix("torch."))
    np.testing.assert_array_equal(np.asarray(node.codes).ravel(), sd["fc.weight"].numpy().ravel())
    np.testing.assert_array_equal(np.asarray(node.scales).ravel(), sd["fc.weight.absmax"].numpy())
    qs = lin.weight.quant_state
    if case["dq"]:
        np.testing.assert_array_equal(np.asarray(node.scales_absmax),
                                      sd["fc.weight.nested_absmax"].numpy())
        assert np.float32(node.scales_offset) == np.float32(qs.offset.item())
    else:
        assert node.scales_absmax is None and node.scales_offset is None
    # bitsandbytes' dequantization of its own weight, transposed to the Flax kernel
    ref = bnbf.dequantize_4bit(lin.weight.data, qs).T.contiguous()
    ours = materialize({"k": node})["k"]
    if case["dtype"] == torch.bfloat16:
        ref, ours = ref.float(), ours.astype(jnp.float32)
    _assert_dequantized_equal(ours, ref.numpy(), case["dq"], case["dtype"] == torch.bfloat16)


def test_quantize_params_of_the_float_kernel_gives_the_same_bytes(case):
    node = case["node"]
    kernel = jnp.asarray(case["w"].float().numpy().T).astype(node.dtype)
    fmt = _FMT[case["kind"]](block_size=case["block"], double_quant=case["dq"])
    ours = quantize_params({"k": kernel}, {"k": fmt})["k"]
    np.testing.assert_array_equal(np.asarray(ours.codes), np.asarray(node.codes))
    assert jax.tree.structure(ours) == jax.tree.structure(node)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(node)):
        assert a.shape == b.shape and a.dtype == b.dtype
    if not case["dq"]:
        np.testing.assert_array_equal(np.asarray(ours.scales), np.asarray(node.scales))
        return
    # double quantization: the offset is a float32 mean summed in another order (PyTorch's
    # order depends on the CPU's vector width, tests/quant/test_weight_formats.py); each is
    # within 1.5 ulp of the exact mean. Where the offsets are equal the codes and nested
    # maxima are equal; otherwise requantizing our float scales with bnb's offset gives them.
    # the float32 block scales (equal to ours, tests/quant/test_weight_formats.py)
    _, plain = bnbf.quantize_4bit(case["w"], blocksize=case["block"], quant_type=case["kind"],
                                  compress_statistics=False)
    plain = plain.absmax.numpy()
    exact = plain.astype(np.float64).mean()
    ulp = np.spacing(np.float32(exact))
    bnb_offset = np.float32(node.scales_offset)
    assert abs(float(ours.scales_offset) - exact) <= 1.5 * ulp
    assert abs(float(bnb_offset) - exact) <= 1.5 * ulp
    if np.float32(ours.scales_offset) == bnb_offset:
        np.testing.assert_array_equal(np.asarray(ours.scales), np.asarray(node.scales))
        np.testing.assert_array_equal(np.asarray(ours.scales_absmax),
                                      np.asarray(node.scales_absmax))
    codes, nested, _ = wq.double_quantize(plain.reshape(node.scales.shape), bnb_offset)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(node.scales))
    np.testing.assert_array_equal(np.asarray(nested), np.asarray(node.scales_absmax))


def test_write_is_byte_identical_to_bitsandbytes(case):
    ref = _np(case["sd"])
    out = to_bnb_state_dict(case["node"], "fc.")
    assert list(out) == list(ref)  # same keys, same order
    for k in ref:
        assert out[k].dtype == ref[k].dtype and out[k].shape == ref[k].shape, k
        np.testing.assert_array_equal(out[k].view(np.uint8), ref[k].view(np.uint8), err_msg=k)


def test_written_weight_runs_in_bitsandbytes_linear4bit(case):
    """effjax's quantization of a kernel, written with ``to_bnb_state_dict`` and loaded by
    ``Params4bit.from_prequantized`` (transformers' path), gives ``x @ materialize + b``."""
    n_in, n_out, dtype = case["n_in"], case["n_out"], case["dtype"]
    kernel = jnp.asarray(np.random.default_rng(7).standard_normal((n_in, n_out)),
                         str(dtype).removeprefix("torch."))
    fmt = _FMT[case["kind"]](block_size=case["block"], double_quant=case["dq"])
    node = quantize_params({"k": kernel}, {"k": fmt})["k"]
    sd = {k: torch.from_numpy(v.copy()) for k, v in to_bnb_state_dict(node, "").items()}
    lin = bnb.nn.Linear4bit(n_in, n_out, bias=True, quant_type=case["kind"],
                            compress_statistics=case["dq"])
    qs = {k.removeprefix("weight."): v for k, v in sd.items() if k != "weight"}
    lin.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], qs, device="cpu", module=lin)
    lin.bias = torch.nn.Parameter(case["b"].float(), requires_grad=False)
    w = np.asarray(materialize({"k": node})["k"], np.float32)
    # the weight bnb holds dequantizes to exactly ours
    deq = bnbf.dequantize_4bit(sd["weight"], lin.weight.quant_state).float().numpy()
    _assert_dequantized_equal(w, deq.T, case["dq"], dtype == torch.bfloat16)
    # bnb's matmul dequantizes to the input's dtype (float32), not to the weight's bfloat16:
    # compare with the float32 dequantization (table value times block scale)
    w = w if dtype == torch.float32 else np.asarray(node.row_view(jnp.float32)).T
    x = np.random.default_rng(3).standard_normal((5, n_in)).astype(np.float32)
    expect = x @ w + case["b"].float().numpy()
    scale = np.abs(x) @ np.abs(w)
    # training mode: bnb's generic path (dequantize, then F.linear in float32). Both sides are
    # float32 dot products of length K over the same (exactly equal) weights, summed in
    # different orders: each within gamma_K * (|x| @ |w|) of the exact value (Higham,
    # Accuracy and Stability, eq. 3.5), so they differ by at most twice that.
    with torch.no_grad():
        y = lin.train()(torch.from_numpy(x)).numpy()
    assert np.all(np.abs(y - expect) <= 2 * n_in * 2.0 ** -24 * scale + 1e-6)
    # inference mode: on a CPU with AVX512-BF16 bnb repacks a bfloat16 weight for its own
    # kernel, which computes in bfloat16 (weight and input rounded to bf16, relative 2^-9
    # each): within 2^-8 (|x| @ |w|). Elsewhere it is the generic path above.
    # That kernel needs out % 32 == 0 (bnb asserts otherwise), so the odd shape stops here.
    if n_out % 32:
        return
    with torch.no_grad():
        y = lin.eval()(torch.from_numpy(x)).numpy()
    tol = 2.0 ** -8 if dtype == torch.bfloat16 else 2 * n_in * 2.0 ** -24
    assert np.all(np.abs(y - expect) <= tol * scale + 1e-6)


def test_weight_in_another_quant_storage_is_read_as_its_bytes():
    lin = bnb.nn.Linear4bit(128, 32, bias=False, quant_type="nf4", quant_storage=torch.float16)
    lin = lin.to("cpu")
    sd = _np(lin.state_dict())
    assert sd["weight"].dtype == np.float16 and sd["weight"].shape == (1024, 1)
    node = from_bnb_state_dict(sd, "", shape=(128, 32))
    assert node.codes.shape == (32, 64) and node.codes.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(node.codes).ravel(),
                                  lin.weight.data.view(torch.uint8).numpy().ravel())
    np.testing.assert_array_equal(np.asarray(node.scales).ravel(), sd["weight.absmax"])


def _tree():
    rng = np.random.default_rng(0)

    def normal(*shape, dtype=np.float32):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    params = {"dense_0": {"kernel": normal(100, 7), "bias": normal(7)},
              "dense_1": {"kernel": normal(64, 32, dtype=jnp.bfloat16)},
              "head": {"kernel": normal(7, 5)},
              "norm": {"scale": jnp.asarray(np.linspace(0.5, 1.5, 7), jnp.float32)},
              "embed": {"embedding": normal(11, 100)}}
    rules = {"dense_0/kernel": NF4(block_size=64, double_quant=True),
             "dense_1/kernel": FP4(block_size=32, double_quant=False)}
    return params, quantize_params(params, rules)


NAMES = {r"dense_(\d)/.*": r"model.layers.\1", "head/kernel": "lm_head", "norm/scale": "norm",
         "embed/embedding": "model.embed_tokens"}


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_tree_round_trips_through_safetensors(tmp_path):
    params, q = _tree()
    f = tmp_path / "model.safetensors"
    keys = save_bnb_checkpoint(f, q, NAMES)
    raw = stn.load_file(str(f))
    assert sorted(raw) == keys
    # PyTorch layout: quantized kernels as bnb entries, float kernels transposed, the rest as is
    assert set(to_bnb_state_dict(q["dense_0"]["kernel"], "model.layers.0.")) <= set(raw)
    np.testing.assert_array_equal(raw["lm_head.weight"], np.asarray(params["head"]["kernel"]).T)
    np.testing.assert_array_equal(raw["model.layers.0.bias"], np.asarray(params["dense_0"]["bias"]))
    np.testing.assert_array_equal(raw["model.embed_tokens.weight"],
                                  np.asarray(params["embed"]["embedding"]))
    assert "model.layers.1.bias" not in raw and len(raw) == 6 + 4 + 4
    # read back into the quantized tree, into its abstract shape, and onto the float tree
    _assert_trees_equal(load_bnb_checkpoint(f, q, NAMES), q)
    _assert_trees_equal(load_bnb_checkpoint(f, jax.eval_shape(lambda: q), NAMES), q)
    _assert_trees_equal(load_bnb_checkpoint(f, params, NAMES), q)
    # a callable gives the same names
    def names(path):
        first, last = path.split("/")[0], path.split("/")[-1]
        if first.startswith("dense_"):
            return f"model.layers.{first[-1]}"
        return {"head": "lm_head", "norm": "norm", "embed": "model.embed_tokens"}[first] \
            if last in ("kernel", "scale", "embedding") else None
    _assert_trees_equal(load_bnb_checkpoint(f, q, names), q)
    # an NNX model's State: the same file's layer 0 into an nnx.Linear
    from flax import nnx
    state = nnx.state(nnx.Linear(100, 7, rngs=nnx.Rngs(0)), nnx.Param)
    loaded = load_bnb_checkpoint(f, state, lambda p: "model.layers.0", strict=False)
    assert type(loaded) is type(state)
    _assert_trees_equal(loaded["kernel"].get_value(), q["dense_0"]["kernel"])
    np.testing.assert_array_equal(np.asarray(loaded["bias"][...]),
                                  np.asarray(params["dense_0"]["bias"]))
    # the file's layer 0 is what to_bnb_state_dict writes, and bitsandbytes loads it
    node = q["dense_0"]["kernel"]
    for k, v in to_bnb_state_dict(node, "model.layers.0.").items():
        assert raw[k].dtype == v.dtype
        np.testing.assert_array_equal(raw[k], v, err_msg=k)
    import safetensors.torch as stt
    tsd = stt.load_file(str(f))
    qs = {k.removeprefix("model.layers.0.weight."): v for k, v in tsd.items()
          if k.startswith("model.layers.0.weight.")}
    weight = bnb.nn.Params4bit.from_prequantized(tsd["model.layers.0.weight"], qs, device="cpu")
    assert weight.quant_state.shape == (7, 100) and weight.quant_type == "nf4"
    assert weight.quant_state.offset.item() == float(node.scales_offset)


def test_mismatches_name_the_key_or_leaf(tmp_path):
    lin, _, _ = _bnb_linear("nf4", True, 100, 7, 64, torch.float32, seed=0)
    sd = _np(torch.nn.ModuleDict({"fc": lin}).state_dict())
    with pytest.raises(ValueError, match=r"prefix 'fc\.'.*\(7, 100\).*\(100, 8\).*\(8, 100\)"):
        from_bnb_state_dict(sd, "fc.", shape=(100, 8))
    for key, bad in [("fc.weight.absmax", sd["fc.weight.absmax"][:-1]),
                     ("fc.weight.nested_absmax", np.zeros(2, np.float32)),
                     ("fc.weight", sd["fc.weight"][:-1]),
                     ("fc.weight.absmax", sd["fc.weight.absmax"].astype(np.float32))]:
        with pytest.raises(ValueError, match=f"'{key}' is "):
            from_bnb_state_dict({**sd, key: bad}, "fc.", shape=(100, 7))
    with pytest.raises(ValueError, match="'fc.weight.quant_map' is not bitsandbytes' nf4"):
        from_bnb_state_dict({**sd, "fc.weight.quant_map": wq.four_bit_table("fp4")}, "fc.",
                            shape=(100, 7))
    with pytest.raises(ValueError, match="no key 'fc.weight.nested_quant_map'"):
        from_bnb_state_dict({k: v for k, v in sd.items() if "nested_quant" not in k}, "fc.",
                            shape=(100, 7))
    with pytest.raises(ValueError, match="prefix 'lin.': no bitsandbytes quant state"):
        from_bnb_state_dict(sd, "lin.", shape=(100, 7))
    with pytest.raises(TypeError, match="NF4 or FP4 weights, got Int8"):
        to_bnb_state_dict(quantize_params({"k": jnp.ones((64, 4))}, {"k": Int8()})["k"])
    # tree level: a leaf of another format, a missing key, unread keys, an int8 leaf
    params, q = _tree()
    f = tmp_path / "m.safetensors"
    save_bnb_checkpoint(f, q, NAMES)
    other = quantize_params(params, {"dense_0/kernel": FP4(block_size=64),
                                     "dense_1/kernel": FP4(block_size=32, double_quant=False)})
    with pytest.raises(ValueError, match="leaf 'dense_0/kernel': the checkpoint holds nf4 b64 "
                                         r"\+dq at 'model.layers.0.weight', params_like fp4"):
        load_bnb_checkpoint(f, other, NAMES)
    with pytest.raises(ValueError, match="leaf 'extra/bias': the checkpoint has no key 'x.bias'"):
        load_bnb_checkpoint(f, {**q, "extra": {"bias": jnp.zeros(3)}}, {**NAMES, "extra/.*": "x"})
    with pytest.raises(ValueError, match=r"leaf 'head/kernel': 'lm_head.weight' has shape "
                                         r"\(5, 7\), expected \(7, 6\)"):
        load_bnb_checkpoint(f, {**q, "head": {"kernel": jnp.zeros((7, 6))}}, NAMES)
    with pytest.raises(ValueError, match=r"3 key\(s\) .* not read: \['lm_head.weight', "
                                         "'model.embed_tokens.weight', 'model.layers.0.bias'"):
        load_bnb_checkpoint(f, q, {r"dense_(\d)/kernel": r"model.layers.\1", "norm/.*": "norm"})
    loaded = load_bnb_checkpoint(f, q, {r"dense_(\d)/kernel": r"model.layers.\1"}, strict=False)
    _assert_trees_equal(loaded["dense_1"], q["dense_1"])
    with pytest.raises(TypeError, match="leaf 'w/kernel'.*NF4 or FP4 weights, got Int8"):
        save_bnb_checkpoint(tmp_path / "x.safetensors",
                            quantize_params({"w": {"kernel": jnp.ones((64, 4))}},
                                            {"w/kernel": Int8()}), {"w/.*": "w"})
    with pytest.raises(ValueError, match="rule 'nothing/.*' matches no leaf"):
        save_bnb_checkpoint(tmp_path / "y.safetensors", q, {**NAMES, "nothing/.*": "z"})
