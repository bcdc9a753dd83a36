"""The application's loggers, under BentoML's (whose handlers print them). Every message
has its control characters and lone surrogates escaped: a value a client sent (a URL, a
field, a header) can never start a line of its own in the log and pass for the server's."""

from __future__ import annotations

import logging

# C0 and C1 controls, DEL, and Unicode's line and paragraph separators: each as \x.. or \u....
_ESCAPED = {
    code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
}


def escaped(text: str) -> str:
    # Lone surrogates too (a header's undecodable bytes), which no log stream can write.
    return text.translate(_ESCAPED).encode("utf-8", "backslashreplace").decode()


class EscapeControls(logging.Filter):
    """Escape control characters in the message as it will be printed (arguments merged)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot be formatted: the handler reports it
            return True
        if (safe := escaped(message)) != message:
            record.msg, record.args = safe, None
        return True


def logger(name: str) -> logging.Logger:
    """The logger of module ``name``, its messages escaped."""
    log = logging.getLogger("bentoml").getChild(name)
    if not any(isinstance(f, EscapeControls) for f in log.filters):
        log.addFilter(EscapeControls())
    return log
