"""Workarounds for defects of BentoML 1.4.40, the version this project pins, fenced apart.

Each module here names the upstream defect it works around, and
``tests/unit/test_bentoml_defects.py`` reproduces each defect on the installed BentoML
unpatched: when a test there fails, upstream has changed, and the workaround can go.
Only the front process patches anything (``apply_to_front``, from the front Service's
constructor); the GPU Service runs BentoML as shipped.

The fence: on another BentoML version start-up stops (``ALLOW_UNTESTED_BENTOML=1``
overrides it, for whoever has re-checked these modules), and on any version each upstream
function a workaround replaces or calls in BentoML's place must still have the signature
it was written for (``UPSTREAM``), or start-up stops naming it.

Handled with BentoML's public hooks, named here so that the list is whole:
- Connection recycling fails requests in flight (``SessionManager``,
  ``_bentoml_impl/client/proxy2.py``): ``connections.NEVER_RECYCLE``, the GPU Service's
  ``runner_connection``.
- A dependency Service's workers close an idle connection after 5 s, its client after 15 s
  (``create_dependency_watcher``, ``_bentoml_impl/server/serving.py``), so a call can be
  written onto a connection being closed: ``connections.resend`` sends a call the GPU
  Service never read once more.
- An upload whose Content-Type names no Pillow plugin (``image/jpg``) raises KeyError in
  ``PILImageEncoder.decode`` (``_bentoml_sdk/validators.py``): ``preprocessing._open``
  opens it from its bytes instead.
- 5xx messages are replaced with a generic one and response headers dropped
  (``_bentoml_impl/server/app.py``, ``api_endpoint_wrapper``): APIs answer their own
  errors with ``errors.answers_errors``.
- A multipart Content-Type without a boundary is a 500 inside BentoML's form parser:
  ``middleware.BodyGuard`` answers it with a 400 before BentoML reads the body.
- The main server refuses a pickled body only where its media type, stripped by
  ``str.strip()``, is exactly BentoML's pickle type (``api_endpoint``), and its readers
  pick their serde from the same stripped value: ``middleware.BodyGuard`` lets only the
  media types the API reads through, rewritten in the one spelling it checked.
- The access log decodes a request's Content-Type as UTF-8 while the answer is being sent
  (``AccessLogMiddleware``, ``bentoml/_internal/server/http/access.py``), and breaks the
  answer off on any other byte: the front's access log leaves the type out
  (``middleware.ACCESS_LOG``).
- ``MultipartSerde.ensure_file`` (``_bentoml_impl/serde.py``) downloads a form text field
  in a file's place itself, with no size or time limit, following redirects:
  ``front/references.ResolveReferences`` resolves every such text under the outbound
  policy, or refuses it, before BentoML reads the request.
- ``api_endpoint_wrapper`` answers a 4xx ``BentoMLException`` with a list,
  ``[{"error": ...}]``, logging a stack trace: ``middleware.ErrorBodies`` puts every error
  answer into one shape (``errors.in_shape``).
- ``ServiceAppFactory.readyz`` probes a dependency with ``AsyncClient.is_ready``, which lets
  its own timeout and a refused connection escape as a 500: the front turns
  ``runner_probe`` off and asks itself (``front/readiness.py``).
- The local task server stores a job's request unread, runs it in the worker that took it,
  cannot cancel, keeps nothing across a restart, and lets a late result overwrite a cancel
  (``ServiceAppFactory.submit_task``, ``cancel_task``, ``Sqlite3Store``): jobs are the
  application's own (``front/jobs.py``, ``front/job_runner.py``, ``front/job_endpoints.py``),
  in front of BentoML's task routes as ASGI middleware.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import typing as t

import bentoml

from . import request_reading, stream_close

logger = logging.getLogger("bentoml").getChild(__name__)

TESTED_VERSION = "1.4.40"

# Each upstream function a workaround replaces or calls in BentoML's place, with the
# signature it had in TESTED_VERSION: (module, qualified name) -> signature.
UPSTREAM: dict[tuple[str, str], str] = {
    **stream_close.UPSTREAM,
    **request_reading.UPSTREAM,
}


class UntestedBentoML(RuntimeError):
    """BentoML is not what the workarounds were written for: start-up stops."""


def _signature(function: t.Callable) -> str:
    """Parameters, their kinds and annotations, and the return annotation; defaults are
    left out (a dependency-injected one prints as an object address)."""
    signature = inspect.signature(function)
    parameters = [p.replace(default=inspect.Parameter.empty) for p in signature.parameters.values()]
    return str(signature.replace(parameters=parameters))


def _upstream(module: str, qualname: str) -> t.Callable:
    owner: t.Any = importlib.import_module(module)
    for part in qualname.split("."):
        owner = getattr(owner, part)
    return owner


def check_upstream(installed: str = bentoml.__version__, allow_untested: bool = False) -> None:
    """Refuse to start on a BentoML these workarounds were not checked against, or
    where a function they patch or call has changed its signature."""
    if installed != TESTED_VERSION and not allow_untested:
        raise UntestedBentoML(
            f"bentoml {installed} is installed, but {__name__} was written for bentoml "
            f"{TESTED_VERSION}: re-check each workaround in {__path__[0]}, then set "
            "ALLOW_UNTESTED_BENTOML=1 to start anyway"
        )
    if installed != TESTED_VERSION:
        logger.warning(
            "bentoml %s is installed; %s was written for %s (ALLOW_UNTESTED_BENTOML=1)",
            installed,
            __name__,
            TESTED_VERSION,
        )
    for (module, qualname), expected in UPSTREAM.items():
        try:
            found = _signature(_upstream(module, qualname))
        except (ImportError, AttributeError) as exc:
            raise UntestedBentoML(
                f"bentoml {installed}: {module}.{qualname}, which {__name__} relies on, "
                f"is gone ({exc}); re-check the workaround that names it"
            ) from None
        if found != expected:
            raise UntestedBentoML(
                f"bentoml {installed}: {module}.{qualname}, which {__name__} relies on, "
                f"changed its signature from {expected} to {found}; re-check the "
                "workaround that names it"
            )


def apply_to_front(allow_untested: bool = False) -> None:
    """Check BentoML (``check_upstream``), then patch what the front process needs;
    safe to call more than once."""
    check_upstream(allow_untested=allow_untested)
    stream_close.apply()
    request_reading.apply()
