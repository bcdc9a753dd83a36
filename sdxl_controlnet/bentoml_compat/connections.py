"""Connection recycling fails requests in flight.

The Service-to-Service client (``_bentoml_impl/client/proxy2.py``, ``SessionManager``)
replaces its aiohttp session after ``max_requests`` (100) or ``max_age`` (300 s) and closes
the old one with requests still running on it, so queued generations failed under load.
Passed as the GPU Service's ``runner_connection`` (public configuration, not a patch),
these limits are never reached. No longer needed when ``SessionManager`` waits for the
requests in flight before closing a session.
"""

NEVER = 2**31 - 1  # requests, or seconds (68 years)
NEVER_RECYCLE = {"max_requests": NEVER, "max_age": float(NEVER)}
