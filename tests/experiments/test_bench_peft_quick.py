"""bench_peft --quick runs end to end on the real all-MiniLM-L6-v2 and reports sane numbers."""

import json

from experiments import bench_peft


def test_bench_peft_quick(tmp_path):
    rows = bench_peft.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench_peft_quick.json").read_text())
    assert (tmp_path / "bench_peft_quick.png").stat().st_size > 0
    md = (tmp_path / "bench_peft_quick.md").read_text()
    assert "| method | trainable params | optimizer state MB |" in md
    by = {r["method"]: r for r in data["rows"]}
    assert [r["method"] for r in rows] == list(by) == list(bench_peft.METHODS)
    for name in bench_peft.METHODS:
        assert f"| {name} |" in md
    full, mat, fast = by["full_ft"], by["lora_materialize"], by["lora_fast"]
    assert full["step_ratio"] == 1.0 and full["peak_ratio"] == 1.0
    # 22.7 M parameters in all-MiniLM-L6-v2 + a 2-class head (384 * 2 + 2)
    assert full["trainable"] == full["total_params"] == 22_713_986
    # LoRA rank 8 on 6 kernels per layer x 6 layers: 6 * 8 * (4 * 768 + 2 * 1920) + the head
    assert mat["trainable"] == fast["trainable"] == 6 * 8 * (4 * 768 + 2 * 1920) + 770
    # adamw: two float32 moments per trainable parameter (+ a step counter)
    assert abs(full["state_bytes"] - 8 * full["trainable"]) <= 16
    assert abs(fast["state_bytes"] - 8 * fast["trainable"]) <= 16
    assert fast["state_bytes"] < full["state_bytes"] / 50
    for r in data["rows"]:
        assert r["step_ms"] > 0 and len(r["times"]) == 3
        assert r["temp_bytes"] > 0 and r["peak_bytes"] > 0
        # the arguments hold at least the 22.7 M float32 parameters
        assert r["argument_bytes"] >= 4 * 22_713_986
    # full FT carries params + two moments (3 x 91 MB) in and out of the step
    assert full["argument_bytes"] >= 3 * 4 * 22_713_986
    # the fast path's temporaries hold no dense deltas or their gradients
    assert fast["temp_bytes"] < mat["temp_bytes"]
    assert fast["peak_bytes"] < mat["peak_bytes"] < full["peak_bytes"]
    # the same adapters and batches: both LoRA paths compute the same losses
    for a, b in zip(mat["losses"], fast["losses"]):
        assert abs(a - b) < 1e-3 * max(1.0, abs(a))
