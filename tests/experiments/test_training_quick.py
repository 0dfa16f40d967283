"""The training experiments' --quick modes run end to end and report what they claim."""

import json

import numpy as np

from experiments import optim_parity, quickstart


def test_quickstart_quick(tmp_path):
    rows = quickstart.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "quickstart_quick.json").read_text())
    assert (tmp_path / "quickstart_quick.png").stat().st_size > 0
    assert "| optimizer |" in (tmp_path / "quickstart_quick.md").read_text()
    assert [r["optimizer"] for r in data["rows"]] == list(quickstart.OPTIMIZERS)
    by_name = {r["optimizer"]: r for r in rows}
    # same init and data: the first loss is identical for every optimizer (before any update)
    first = {r["train_losses"][0] for r in rows}
    assert len(first) == 1
    assert by_name["optax.adamw"]["bytes_per_param"] > 7.9  # two float32 moments (+ counters)
    assert by_name["adamw_4bit"]["state_bytes"] < by_name["adamw_8bit"]["state_bytes"] < (
        by_name["optax.adamw"]["state_bytes"])
    for r in rows:  # the quick run does learn: loss falls from log(vocab) ~ 4.4
        assert r["final_eval"] < r["train_losses"][0] and np.isfinite(r["final_eval"])


def test_optim_parity_quick(tmp_path):
    rows = optim_parity.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "optim_parity_quick.json").read_text())
    assert (tmp_path / "optim_parity_quick.png").stat().st_size > 0
    assert {(r["task"], r["optimizer"]) for r in rows} == {
        (t, o) for t in ("lm", "cnn") for o in optim_parity.OPTIMIZERS}
    runs = data["runs"]
    assert len(runs) == 2 * 2 * len(optim_parity.OPTIMIZERS)  # tasks x seeds x optimizers
    for r in rows:  # mean and ratio recomputed from the per-seed runs
        vals = [x["val_loss"] for x in runs if (x["task"], x["optimizer"]) == (r["task"],
                                                                             r["optimizer"])]
        base = [x["val_loss"] for x in runs if (x["task"], x["optimizer"]) == (
            r["task"], "adamw (fp32)")]
        assert abs(r["val_loss"][0] - np.mean(vals)) < 1e-9
        assert abs(r["val_loss"][1] - np.std(vals, ddof=1)) < 1e-9
        assert abs(r["val_loss_ratio"] - np.mean(vals) / np.mean(base)) < 1e-9
        if r["task"] == "cnn":
            assert 0.0 <= r["test_acc"][0] <= 1.0
