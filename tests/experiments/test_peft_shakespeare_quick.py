"""experiments/peft_shakespeare.py --quick runs both parts end to end and reports what it claims."""

import json
import math

import jax
import numpy as np

from effjax.peft import inject, split
from experiments import peft_shakespeare as ps


def _count(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


# The quick run trains a subset (each row costs 10-20 s of CPU) covering the script's code
# paths: the baselines, a LoRA-family row and both calibration kinds (EVA: inputs, LoRA-SB:
# gradients). Every other method of METHODS is injected (with its calibration) in the
# trainable-count check below; the count formulas of each method (PiSSA, VeRA, DoRA...) are
# checked by tests/peft's conformance table. (PiSSA and VeRA rows, then DoRA and WeLore, were
# dropped to keep the suite under 20 minutes; WeLore's rules-from-weights path is
# tests/peft/test_welore.py's.)
QUICK = ["head only", "full FT", "LoRA", "EVA", "LoRA-SB"]
# Methods that change W at init by design (first loss differs from the head-only run):
# LoRA-SB starts from the truncated first full-FT step.
CHANGE_W = {"LoRA-SB"}


def test_peft_shakespeare_quick(tmp_path):
    result = ps.main(["--quick", "--no-progress", "--out", str(tmp_path), "--methods", *QUICK])
    data = json.loads((tmp_path / "peft_shakespeare_quick.json").read_text())
    md = (tmp_path / "peft_shakespeare_quick.md").read_text()
    assert (tmp_path / "peft_shakespeare_quick.png").stat().st_size > 0

    # (a): one row per method, in the table's order, in the json and the markdown
    rows = result["a"]["rows"]
    assert [r["method"] for r in rows] == QUICK
    assert [r["method"] for r in data["a"]["rows"]] == QUICK
    for name in QUICK:
        assert f"| {name} |" in md
    by = {r["method"]: r for r in rows}

    # trainable counts: the row's summary() count equals the arrays split() hands the optimizer
    from effjax.models.minilm import load_minilm
    minilm = load_minilm()
    graph, base = ps.classifier_params(minilm, 0)
    head = 384 * 3 + 3
    encoder_minus_pooler = _count(base["encoder"]) - _count(base["encoder"]["pooler"])
    texts, labels = ps.balanced_lines("train", 2, seed=0)
    calib_batch = ps.tokenize(minilm, texts, 16)
    calib_batch.pop("truncated")
    calib_batch["label"] = labels.astype(np.int32)
    for name, method in ps.METHODS.items():
        rules = ps.build_rules(method, "qv", base)
        calib = ps.calibration_data(rules, graph, base, [calib_batch])
        tree = inject(base, rules, key=jax.random.key(0), calibration=calib)
        n = _count(split(tree)[0])
        assert n > head or name == "head only", name  # the others train encoder params too
        if name in by:
            assert by[name]["trainable"] == n, name
    assert by["head only"]["trainable"] == head
    assert by["full FT"]["trainable"] == encoder_minus_pooler + head
    # LoRA r=8 on 6 layers x {query, value} (384 -> 384): 12 * 8 * (384 + 384), plus the head
    assert by["LoRA"]["trainable"] == 12 * 8 * 768 + head
    assert by["LoRA"]["trainable"] < 0.01 * by["full FT"]["trainable"]

    # same head init, data and first batch: the first loss is the same for every method (the
    # adapters start at W' = W)
    first = by["head only"]["first_loss"]
    assert abs(first - math.log(3)) < 0.05  # a near-zero head: about uniform over 3 classes
    for r in rows:
        if r["method"] not in CHANGE_W:
            assert abs(r["first_loss"] - first) < 1e-4, r["method"]
        else:
            assert abs(r["first_loss"] - first) < 0.05, r["method"]  # changed, but mildly
        assert 0.0 <= r["val_acc"] <= 1.0 and 0.0 <= r["test_acc"] <= 1.0
        assert r["step_ms"] > 0 and np.isfinite(r["final_train_loss"])
        assert r["lr"] == ps.LR.get(r["family"], 0.0)
    assert by["full FT"]["step_ratio"] == 1.0
    assert result["a"]["n_train"] == 48  # 16 lines per genre

    # (b): LoRA on SmolLM2-135M's q/v kernels: 30 layers x 8 x ((576 + 576) + (576 + 192))
    b = result["b"]
    assert b["trainable"] == 30 * 8 * (1152 + 768)
    assert b["trainable"] < 0.005 * b["total"]
    assert np.isfinite(b["ppl_before"]) and np.isfinite(b["ppl_after"])
    # the instruct model already knows English: well below the 49,152-token vocabulary
    assert 1.0 < b["ppl_before"] < 1000.0
    # 5 steps on training plays lower the perplexity of held-out plays (script format)
    assert b["ppl_after"] < b["ppl_before"]
    assert len(b["train_losses"]) == 5 and all(np.isfinite(b["train_losses"]))


def test_balanced_lines_and_tokenize():
    texts, labels = ps.balanced_lines("validation", 5, seed=0)
    assert np.bincount(labels, minlength=3).tolist() == [5, 5, 5]
    assert len(set(texts)) == len(texts) == 15
    again = ps.balanced_lines("validation", 5, seed=0)
    assert again[0] == texts  # deterministic

    from effjax.models.minilm import load_minilm
    minilm = load_minilm()
    enc = ps.tokenize(minilm, ["What, ho!", "a " * 40], max_len=8)
    ref = minilm.tokenize(["What, ho!"])["input_ids"][0]
    assert enc["ids"][0, :len(ref)].tolist() == ref.tolist()
    assert enc["mask"][0].tolist() == [1] * len(ref) + [0] * (8 - len(ref))
    assert enc["truncated"] == 1
    sep = minilm.tokenizer.token_to_id("[SEP]")
    assert enc["ids"][1, -1] == sep and enc["mask"][1].all()  # cut line still ends in [SEP]


def test_gradient_calibration_hook():
    """Data-driven methods (``calibration = "gradients"``, e.g. LoRA-SB) get the mean loss
    gradient of each targeted kernel over the calibration batches, in inject's format."""
    import dataclasses
    from typing import ClassVar

    import jax.numpy as jnp
    import optax

    from effjax.models.minilm import load_minilm
    from effjax.peft import Unfreeze, adapter_paths

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class GradProbe(Unfreeze):  # a stand-in data-driven method: checks what inject passes it
        calibration: ClassVar[str] = "gradients"

        def adapt(self, key, w, data=None):
            assert data is not None and data.shape == w.shape
            return super().adapt(key, w)

    minilm = load_minilm()
    graph, base = ps.classifier_params(minilm, 0)
    texts, labels = ps.balanced_lines("validation", 2, seed=0)
    data = ps.tokenize(minilm, texts, 24)
    data.pop("truncated")
    data["label"] = labels.astype(np.int32)
    b1, b2 = ({k: v[s] for k, v in data.items()} for s in (slice(0, 3), slice(3, 6)))

    rules = ps.build_rules(ps.Method(lambda t: {t: GradProbe()}, "low-rank"), "qv")
    calib = ps.calibration_data(rules, graph, base, [b1, b2])
    kernels = [f"encoder/layers/{i}/{k}/kernel" for i in range(6) for k in ("query", "value")]
    assert sorted(calib) == sorted(kernels)

    def loss(p, b):
        return optax.softmax_cross_entropy_with_integer_labels(
            ps.logits_fn(graph, p, b), b["label"]).mean()

    grads = [jax.grad(loss)(base, b)["encoder"]["layers"][2]["value"]["kernel"] for b in (b1, b2)]
    want = (grads[0] + grads[1]) / 2
    got = calib["encoder/layers/2/value/kernel"]
    assert float(jnp.abs(want).max()) > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(jnp.abs(want).max()))

    tree = inject(base, rules, key=jax.random.key(0), calibration=calib)
    assert sorted(p for p in adapter_paths(tree) if p.startswith("encoder/")) == sorted(kernels)
    # methods without calibration get none
    assert ps.calibration_data(ps.build_rules(ps.METHODS["LoRA"], "qv"), graph, base, [b1]) is None
