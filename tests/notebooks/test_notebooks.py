"""Every notebook runs top to bottom without error (tiny settings injected in its first code
cell, which holds only parameters)."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = {  # notebook -> replacement for its parameters cell (WIDTH 64: leaves of >= 4096
    # values, so the 8-bit state really is quantized)
    "01_quickstart.ipynb": "STEPS = 6\nBATCH = 4\nSEQ_LEN = 32\nWIDTH = 64\nDEPTH = 1\n"
                           "LR = 3e-3\nEVAL_WINDOWS = 8",
    "02_peft.ipynb": "TRAIN_LINES = 24\nEVAL_LINES = 20\nMAX_LEN = 32\nBATCH = 8\nSTEPS = 3\n"
                     "RANK = 2\nLR = 5e-4",
    # one of SmolLM2's 30 blocks; rank 8 so that the LoRA factors (576 x 8) have >= 4096 values
    # and the 8-bit optimizer state really is quantized
    "03_qlora.ipynb": "LAYERS = 1\nTRAIN_PLAYS = 1\nSTEPS = 3\nBATCH = 2\nSEQ_LEN = 16\nRANK = 8\n"
                      "LR = 1e-3\nNEW_TOKENS = 4\nEVAL_WINDOWS = 4",
}
# notebook -> texts its printed output must contain (besides: no error, a plot drawn)
EXPECTED = {
    "01_quickstart.ipynb": ["bytes per parameter", "8-bit state is"],
    # the rank-2 LoRA on 6 x {query, value} (384 -> 384) plus the 384 x 3 head and its bias
    "02_peft.ipynb": [f"trainable params: {12 * 2 * 768 + 384 * 3 + 3:,d}", "LoRAWeight",
                      "merged kernel is a plain array: True (384, 384)",
                      "merged vs adapter logits", "round trip: identical weights = True",
                      " 1,155 trainable params"],
    # NF4 + double quant at block 64: 4 + 8 / 64 + 32 / (64 * 256) bits (bitsandbytes'); rank 8
    # on one block's q, o (576 -> 576), k, v (576 -> 192), gate, up (576 -> 1536) and
    # down (1536 -> 576): r * (in + out) each
    "03_qlora.ipynb": ["nf4 b64 +dq", "4.127 bits/param", "LoRAWeight over QuantizedWeight",
                       f"trainable params: {8 * (2 * 1152 + 2 * 768 + 3 * 2112):,d}",
                       "8-bit AdamW state", "adapter_model.safetensors", "'peft_type': 'LORA'",
                       "target_modules: 7 modules", "held-out loss: merged model"],
}


def test_every_notebook_has_tiny_settings():
    assert sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")) == sorted(TINY)
    assert sorted(EXPECTED) == sorted(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_notebook_executes(name):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    params = next(c for c in nb.cells if c.cell_type == "code")
    assert params.source.startswith("# Parameters"), "first code cell must hold the parameters"
    params.source = TINY[name]
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for expected in EXPECTED[name]:
        assert expected in text, expected
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot was drawn
