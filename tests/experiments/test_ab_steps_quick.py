"""ab_steps: --quick times every row in this tree, and --summarize tabulates two labels."""

import json

from experiments import ab_steps


def test_quick_then_summarize(tmp_path):
    log = tmp_path / "ab.jsonl"
    ab_steps.main(["--quick", "--label", "before", "--log", str(log)])
    run = json.loads(log.read_text())
    assert set(run["ms"]) == set(ab_steps.ROWS) and min(run["ms"].values()) > 0
    # a second run, written by hand: every effjax row 10% slower relative to adamw
    after = dict(run, label="after", ms={k: v * (1.0 if k == "adamw" else 1.1)
                                         for k, v in run["ms"].items()})
    with open(log, "a") as f:
        f.write(json.dumps(after) + "\n")
    rows = ab_steps.summarize(str(log), str(tmp_path)).splitlines()[2:]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == list(ab_steps.ROWS[1:])
    assert all(r.endswith("| +10.0% |") for r in rows), rows
    assert (tmp_path / "ab_steps.png").stat().st_size > 0
