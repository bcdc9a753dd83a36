"""The job store's engines, one module each; ``JOB_STORE_URL`` chooses.

- Empty (the default): ``sqlite_store``, the embedded store of one host, a file in
  ``$BENTOML_HOME`` shared by that host's front workers.
- ``redis://``, ``rediss://`` or ``unix://``: ``redis_store``, a Redis (7 or later) or Valkey
  shared by every replica, so that any of them answers for any job and takes over the jobs
  of one that died.
"""

from __future__ import annotations

from ...settings import settings
from ..jobs import JobStore
from .redis_store import RedisJobStore
from .sqlite_store import SQLiteJobStore, default_path


def from_settings() -> JobStore:
    """The store ``JOB_STORE_URL`` names; not opened yet (``JobStore.open``)."""
    if settings.job_store_url:
        return RedisJobStore(settings.job_store_url)
    return SQLiteJobStore(default_path())
