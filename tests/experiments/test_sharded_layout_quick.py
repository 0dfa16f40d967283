"""experiments/sharded_layout.py --quick: the table it writes, checked against sizes counted by
hand (two 8-bit moments: 2 bytes of codes per element + 8 bytes per block of scales)."""

import json

import pytest

from experiments import sharded_layout

# The script divides byte counts by element counts; the expected values are the same fractions
# written another way, so they agree to float64 rounding, not bit for bit.
approx = lambda x: pytest.approx(x, rel=1e-12, abs=0)


def test_sharded_layout_quick(tmp_path):
    rows = sharded_layout.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "sharded_layout_quick.json").read_text())
    assert (tmp_path / "sharded_layout_quick.png").stat().st_size > 0
    md = (tmp_path / "sharded_layout_quick.md").read_text()
    assert data["rows"] == rows and len(rows) == 4
    by = {(r["name"], r["spec"]): r for r in rows}
    # (384, 1536) P('x', 'y'): (96, 768) shards of 3 whole blocks a row: the flat layout stays
    r = by[("MiniLM ffn in (384, 1536)", "P('x', 'y')")]
    assert r["layout"] == "flat" and r["flat"] == r["chosen"] == approx(2 + 8 * 6 / 1536)
    # (1536, 384) P('x', 'y'): shards (384, 192), rows shorter than a block merged into one
    # axis of 73728 = 288 whole blocks: one scale per 256 elements, as flat
    r = by[("MiniLM ffn out (1536, 384)", "P('x', 'y')")]
    assert r["layout"] == "shard-local (4, 2)"
    assert r["chosen"] == approx(2 + 8 * 288 * 8 / (1536 * 384))
    # (1000, 1000): flat rows of 4 blocks (3 whole, 1 short); shards (250, 500): rows of 2
    r = by[("(1000, 1000)", "P('x', 'y')")]
    assert r["flat"] == approx(2 + 8 * 4 / 1000) and r["chosen"] == approx(2 + 8 * 2 / 500)
    # (384, 12, 64) P(None, 'y', None): 6 heads of 64 a shard, 384 per row: 1.5 blocks,
    # grouped 2 rows at a time (3 blocks); flat rows merge 768 = 3 blocks
    r = by[("attention (384, 12, 64)", "P(None, 'y', None)")]
    assert r["layout"] == "shard-local (1, 2, 1)"
    assert r["chosen"] == r["flat"] == approx(2 + 8 * 3 / 768)
    for name, _spec in by:
        assert f"| {name} |" in md
