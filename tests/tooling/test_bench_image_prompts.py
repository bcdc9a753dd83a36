"""`make bench`'s rows for image prompts, run for real on the tiny IP-Adapter, small and
once: each measured against its baseline in the same run."""

from __future__ import annotations

from bench import inprocess


def test_an_image_prompt_is_measured_against_none_and_its_cache_against_encoding() -> None:
    rows = inprocess.image_prompt_rows(runs=1, side=64, steps=2)
    assert [row.name.split(":")[0] for row in rows] == [
        "image prompt",
        "image prompt",
        "image prompt cache",
    ]
    for row in rows:
        assert row.section == "image prompts"
        assert len(row.values) == len(row.baseline) == 1  # side by side, one run each
        assert row.ratio > 0
    assert rows[2].ratio < 1  # a repeat is taken from the cache, not encoded again
