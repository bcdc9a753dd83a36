"""`make bench`'s rows for a second control, run for real on the tiny model, small and once:
one row per way to serve several controls, each against one control in the same run."""

from __future__ import annotations

import torch

from bench import inprocess


def test_a_second_control_is_measured_against_one_on_both_configurations() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # not one, so that the rows' putting it back shows
    try:
        rows = inprocess.control_rows(runs=1, side=64, steps=2)
        assert torch.get_num_threads() == 2  # the rows after them run as before
    finally:
        torch.set_num_threads(threads)

    ways = [row.name.split(", ")[1] for row in rows]
    assert ways == ["a ControlNet each", "one ControlNet Union"]
    for row in rows:
        assert row.section == "controls"
        assert row.name.startswith("canny + depth vs canny alone, ")
        assert "64² 2 steps" in row.name
        assert len(row.values) == len(row.baseline) == 1  # interleaved, one run each
        assert row.ratio > 0
        assert "second ControlNet forward" in row.note
