"""bench_dequant_matmul: --quick runs end to end on CPU (kernel in interpret mode), is labelled
as not-GPU figures, and finds the kernel equal to XLA's dequantize-then-dot within the
summation-order bound; without --quick it refuses to run off a GPU."""

import json

import pytest

from experiments import bench_dequant_matmul as bench


def test_refuses_without_gpu_unless_quick(tmp_path):
    with pytest.raises(SystemExit, match="no GPU"):
        bench.main(["--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_kernel_bytes():
    # K=N=4096, block 64, batch 1: codes K N / 2 + absmax 4 K N / 64 + bf16 x and y
    assert bench.kernel_bytes(1, 4096, 4096, 64) == 4096 * 4096 * (0.5 + 4 / 64) + 4 * 4096


def test_quick_mode(tmp_path, capsys):
    rows = bench.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "device: cpu" in out and "NOT GPU FIGURES" in out
    data = json.loads((tmp_path / "bench_dequant_matmul_quick.json").read_text())
    md = (tmp_path / "bench_dequant_matmul_quick.md").read_text()
    assert (tmp_path / "bench_dequant_matmul_quick.png").stat().st_size > 0
    assert "not GPU figures" in md and data["meta"]["quick"] is True
    assert data["meta"]["gpu"] is False
    # the table: a header of 10 columns and one row per batch 1, 16, 256
    table = [line for line in md.splitlines() if line.startswith("|")]
    header, body = table[0], table[2:]
    assert [c.strip() for c in header.strip("|").split("|")][:3] == [
        "K x N", "batch", "dense bf16 ms"]
    assert all(len(line.strip("|").split("|")) == 10 for line in table)
    assert [int(line.split("|")[2]) for line in body] == [1, 16, 256]
    assert len(rows) == len(data["rows"]) == 3
    assert [r["batch"] for r in rows] == [1, 16, 256]
    for r in rows:
        assert set(bench.COLUMNS) <= set(r)
        for m in ("dense", "kernel", "kernel_lora", "xla", "xla_lora"):
            assert r[f"{m}_ms"] > 0
        for m in ("kernel", "kernel_lora", "xla", "xla_lora"):
            assert r[f"{m}_vs_dense"] == pytest.approx(r[f"{m}_ms"] / r["dense_ms"])
        # kernel + LoRA == XLA dequantize-then-dot + LoRA on the same inputs: within the
        # summation-order bound plus one bf16 rounding, and so within 1/128 of the largest output
        assert r["within_bound"] is True, r
        assert r["ref_max_abs"] > 0 and r["max_abs_err"] <= r["ref_max_abs"] * 2.0**-7, r
