"""The benchmark's --quick mode runs end to end and reports what it claims to measure."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_optim, model_trees


def test_bench_optim_quick(tmp_path):
    rows = bench_optim.main(["--quick", "--no-peers", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench_optim_quick.json").read_text())
    assert (tmp_path / "bench_optim_quick.png").stat().st_size > 0
    assert "| optimizer |" in (tmp_path / "bench_optim_quick.md").read_text()
    by_name = {r["optimizer"]: r for r in data["rows"]}
    assert list(by_name) == list(bench_optim.QUICK_ROWS)
    assert set(bench_optim.QUICK_ROWS) < set(bench_optim.optimizers())
    assert len(rows) == len(by_name)
    assert by_name["optax.adamw"]["ratio"] == 1.0
    # two float32 moments plus the int32 step counter
    assert abs(by_name["optax.adamw"]["bytes_per_param"] - 8.0) < 1e-3
    # The quick tree's leaves are small, so some stay float32; still far below 8 bytes.
    assert by_name["adamw_8bit"]["bytes_per_param"] < 2.2
    assert by_name["adamw_4bit"]["bytes_per_param"] < by_name["adamw_8bit"]["bytes_per_param"]
    # the default and the unfused step keep the same state
    assert (by_name["adamw_8bit (unfused)"]["bytes_per_param"]
            == by_name["adamw_8bit"]["bytes_per_param"])
    assert all(r["step_ms"] > 0 for r in data["rows"])
    # projecting the attention kernels too (row_axes) leaves less full-size state
    assert (by_name["galore_adamw+einsum"]["bytes_per_param"]
            < by_name["galore_adamw"]["bytes_per_param"] < 8.0)
    assert (by_name["fira_adamw+einsum"]["bytes_per_param"]
            < by_name["fira_adamw"]["bytes_per_param"])
    # bfloat16 scales: the same codes and float32 small tensors, half the scale bytes
    for bits in (8, 4):
        f32, bf16 = (by_name[f"adamw_{bits}bit{s}"]["by_kind"] for s in ("", " (bf16 scales)"))
        assert bf16["codes"] == f32["codes"] and bf16["float"] == f32["float"] > 0
        assert abs(bf16["scales"] - f32["scales"] / 2) < 1e-12 and f32["scales"] > 0
        assert abs(sum(f32.values()) - by_name[f"adamw_{bits}bit"]["bytes_per_param"]) < 1e-9
    assert "| codes | scales |" in (tmp_path / "bench_optim_quick.md").read_text()
    # Real models' trees (shapes only): the grouped-row layout costs exactly what the anchors'
    # flat blocks cost on the same tree (hidden sizes 384 and 576 are not whole blocks), and
    # meets the 8-bit target (2.04) everywhere. In 4-bit the quantized leaves cost 1.0625
    # (codes + float32 scales of 128); MiniLM keeps 1.1% of its parameters in tensors under
    # 4096 elements (biases, LayerNorms: float32 moments, +0.0112), hence its 1.0722.
    models = {(r["model"], r["optimizer"]): r for r in data["model_rows"]}
    assert {m for m, _ in models} == set(model_trees.MODELS)
    for (model, name), r in models.items():
        k = r["by_kind"]
        assert abs(sum(k.values()) - r["bytes_per_param"]) < 1e-12
        if name == "optax.adamw":
            assert abs(r["bytes_per_param"] - 8.0) < 1e-6
            continue
        assert r["bytes_per_param"] == r["flat_layout"], (model, name)
        if "8bit" in name:
            assert r["bytes_per_param"] <= 2.04, (model, name)
        else:
            assert k["codes"] + k["scales"] <= 1.0625 + 1e-12, (model, name)
    assert models["LLaMA-2-7B", "adamw_8bit"]["params"] == 6_738_415_616
    assert "| model | params |" in (tmp_path / "bench_optim_quick.md").read_text()


def test_flat_layout_bytes_by_hand():
    shapes = {"w": jax.ShapeDtypeStruct((300, 384), jnp.float32),  # 115200 = 450 blocks of 256
              "b": jax.ShapeDtypeStruct((10,), jnp.float32), "v": jnp.zeros(4097)}
    assert bench_optim.flat_layout_bytes(shapes, 8) == (2 * (115200 + 450 * 4) + 80
                                                        + 2 * (4097 + 17 * 4))
    # 4-bit: blocks of 128, half a byte a code; bfloat16 scales
    assert bench_optim.flat_layout_bytes(shapes, 4, 2) == (2 * (57600 + 900 * 2) + 80
                                                           + 2 * (2049 + 33 * 2))


def test_bench_optim_grads_in_step_quick(tmp_path):
    rows = bench_optim.main(["--quick", "--grads-in-step", "--out", str(tmp_path)])
    assert [r["optimizer"] for r in rows] == list(bench_optim.IN_STEP_ROWS)  # no peers
    md = (tmp_path / "bench_optim_grads_in_step_quick.md").read_text()
    assert "--grads-in-step" in md and "| model |" not in md
    p = {"a": jnp.linspace(-3.0, 3.0, 12).reshape(3, 4), "b": jnp.arange(5.0)}
    c = jax.tree.map(lambda x: x * 0.5 + 1.0, p)
    g = bench_optim.grads_in_step(p, c)
    for k in p:  # d/dp sum(p * p * c) / 2 = p * c
        np.testing.assert_allclose(g[k], np.asarray(p[k]) * np.asarray(c[k]), rtol=1e-6)
