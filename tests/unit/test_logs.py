"""Nothing a client sends can forge a line of the server's log."""

from __future__ import annotations

import logging

import pytest

from sdxl_controlnet import logs, outbound
from sdxl_controlnet.front import fetching

FORGED = "\n2026-12-07T00:00:00+0000 [ERROR] [entry_service:ControlNet:1] FORGED"


@pytest.mark.anyio
async def test_a_url_a_client_sent_is_logged_on_one_line(caplog) -> None:
    with caplog.at_level(logging.WARNING), pytest.raises(outbound.Refused):
        await fetching.fetch(f"https:///{FORGED}\r")
    (record,) = [r for r in caplog.records if r.name.startswith("bentoml.sdxl_controlnet")]
    assert "\n" not in caplog.text.strip() and "\r" not in caplog.text
    assert "\\x0a2026-12-07" in record.getMessage()


def test_every_control_character_and_line_separator_is_escaped() -> None:
    text = "".join(map(chr, [*range(0x20), 0x7F, 0x85, 0x2028, 0x2029, 0xDCB2])) + "é ok"
    assert logs.escaped(text).isprintable()
    assert logs.escaped(text).endswith("\\x85\\u2028\\u2029\\udcb2é ok")


def test_a_record_that_cannot_be_formatted_is_left_to_the_handler() -> None:
    # Escaping formats the message first: a wrong format must not raise at the call site.
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "%d steps", ("many",), None)
    assert logs.EscapeControls().filter(record)
    assert record.args == ("many",)  # as it was, for the handler to report
