"""The training experiments' --quick modes run end to end and report what they claim."""

import json

import numpy as np

from experiments import optim_parity, quickstart


def test_quickstart_quick(tmp_path):
    rows = quickstart.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "quickstart_quick.json").read_text())
    assert (tmp_path / "quickstart_quick.png").stat().st_size > 0
    assert "| optimizer |" in (tmp_path / "quickstart_quick.md").read_text()
    assert [r["optimizer"] for r in data["rows"]] == list(quickstart.QUICK_OPTIMIZERS)
    assert set(quickstart.QUICK_OPTIMIZERS) < set(quickstart.OPTIMIZERS)
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


def test_stable_spam_4bit_quick(tmp_path):
    from experiments import stable_spam_4bit

    rows = stable_spam_4bit.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    assert (tmp_path / "stable_spam_4bit_quick.png").stat().st_size > 0
    data = json.loads((tmp_path / "stable_spam_4bit_quick.json").read_text())
    assert [r["method"] for r in data["rows"]] == list(stable_spam_4bit.methods(
        stable_spam_4bit.parse(["--quick"])))
    by = {r["method"]: r for r in rows}
    # int4 QAT changes the forward pass: same init and data, different first loss than fp32
    assert by["adam int4"]["train_losses"][0] != by["adam fp32"]["train_losses"][0]
    # 4-bit Adam reaches its own final moving average exactly at the last window
    assert by["adam int4"]["steps_to_adam_int4"] is not None
    for r in rows:
        assert np.isfinite(r["val_loss"]) and r["spikes"] >= 0


def test_spike_and_reach_metrics():
    from experiments.stable_spam_4bit import spikes, steps_to_reach

    losses = [2.0] * 30
    losses[25] = 2.6  # 1.3x the median of the previous 20 steps: one spike
    losses[27] = 2.4  # 1.2x: not a spike
    assert spikes(losses) == 1
    falling = list(np.linspace(3.0, 1.0, 50))
    # the average of steps k+1..k+20 is the line at index k + 9.5: 3 - 2 (k + 9.5) / 49 <= 1.9
    # first holds at k = 18, i.e. after step 38
    assert steps_to_reach(falling, 1.9, window=20) == 38
    assert steps_to_reach(falling, 0.5) is None
