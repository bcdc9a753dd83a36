"""The front's readiness: ready when the GPU Service answers that it is, within a few
seconds, so that ``/readyz`` answers quickly at every moment of the GPU Service's life.

BentoML's own probe of a dependency (``runner_probe``, which the front turns off) asks
with a client that lets a timeout or a refused connection escape as a 500, after up to
the 5 s it hard-codes, and never releases the answer (``bentoml_compat/__init__.py``)."""

from __future__ import annotations

import asyncio
import typing as t

from .. import logs

logger = logs.logger(__name__)

# How long the front waits for the GPU Service's /readyz: well inside the 5 s a load
# balancer's or Kubernetes' probe allows, and the 1 s Kubernetes sets by default is the
# probe's own business.
PROBE_TIMEOUT_S = 1.5
# The configuration that turns BentoML's own dependency probe off.
NO_RUNNER_PROBE = {"enabled": False}


async def dependency_ready(dependency: t.Any, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether ``dependency`` (what ``bentoml.depends`` gave) answers ready within
    ``timeout_s``. A dependency in the same process is the Service object itself: ready."""
    probe = getattr(dependency, "is_ready", None)
    if probe is None:
        return True
    try:
        async with asyncio.timeout(timeout_s):
            return bool(await probe(timeout_s))
    except Exception as exc:  # down, restarting, or still loading: not ready
        logger.debug("the GPU Service is not ready: %r", exc)
        return False
