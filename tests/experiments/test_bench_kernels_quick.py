"""bench_kernels: --quick runs end to end on CPU (kernel in interpret mode) and is labelled as
not-GPU figures; without --quick it refuses to run off a GPU."""

import json

import pytest

from experiments import bench_kernels, check_kernels


def test_bytes_moved_per_element():
    # p, g read (8) + two codes read (2) + p written (4) + two codes written (2) = 16,
    # plus 2 absmax (float32) read and written per 256-element block
    assert bench_kernels.bytes_per_element_8bit(256) == pytest.approx(16 + 16 / 256)


def test_refuses_without_gpu_unless_quick(tmp_path):
    with pytest.raises(SystemExit, match="no GPU"):
        bench_kernels.main(["--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_quick_mode(tmp_path):
    rows = bench_kernels.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench_kernels_quick.json").read_text())
    md = (tmp_path / "bench_kernels_quick.md").read_text()
    assert (tmp_path / "bench_kernels_quick.png").stat().st_size > 0
    assert "not GPU figures" in md and data["meta"]["quick"] is True
    assert len(rows) == len(data["rows"]) == 2
    for r in rows:
        assert r["elements"] % bench_kernels.ROW == 0
        assert r["copy_gbs"] > 0 and r["fused_gbs"] > 0
        assert r["fused_ms"] > 0 and r["adamw_ms"] > 0 and r["jnp8_ms"] > 0
        assert r["fused_update_ms"] > 0
        assert r["fused_vs_adamw"] == pytest.approx(r["fused_ms"] / r["adamw_ms"])
        assert r["fused_update_vs_adamw"] == pytest.approx(r["fused_update_ms"] / r["adamw_ms"])
        assert r["torchao_ms"] is None  # no CUDA here


def test_check_kernels_quick_finds_interpret_mode_exact(tmp_path):
    """check_kernels --quick (interpret mode): codes equal the jnp path's; updates too, up to
    the Adam family's documented ulps."""
    out = tmp_path / "check.json"
    rows = check_kernels.main(["--quick", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["meta"]["interpret"] is True and len(data["rows"]) == len(rows)
    assert {r["case"] for r in rows if r["kernel"] == "optimizer"} == set(check_kernels.OPTIMIZERS)
    for r in rows:
        assert r["codes"] > 0 and r["code_mismatch"] == 0 and r["absmax_equal"], r
        if r["kernel"] == "optimizer":
            assert r["apply_vs_update_max_ulps"] == 0, r
            if r["case"] in ("lion_8bit", "sgd_8bit"):
                assert r["update_max_ulps"] == 0 and r["param_drift_rel"] == 0.0, r
            else:  # Adam family: XLA:CPU contracts FMAs differently in the kernel body (the
                # documented few-ulp difference, as in tests/pallas_kernels/test_optim_update)
                assert r["update_max_ulps"] <= 8 and r["param_drift_rel"] < 1e-5, r
        else:
            assert r["dequant_equal"], r


def test_check_kernels_refuses_without_gpu_unless_quick():
    with pytest.raises(SystemExit, match="no GPU"):
        check_kernels.main([])
