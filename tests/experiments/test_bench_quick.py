"""The benchmark's --quick mode runs end to end and reports what it claims to measure."""

import json

from experiments import bench_optim


def test_bench_optim_quick(tmp_path):
    rows = bench_optim.main(["--quick", "--no-peers", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench_optim_quick.json").read_text())
    assert (tmp_path / "bench_optim_quick.png").stat().st_size > 0
    assert "| optimizer |" in (tmp_path / "bench_optim_quick.md").read_text()
    by_name = {r["optimizer"]: r for r in data["rows"]}
    assert len(rows) == len(by_name) == len(bench_optim.optimizers())
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
