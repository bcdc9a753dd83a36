"""A client-side fix for BentoML 1.4.40's ``SyncHTTPClient``, for the tests' own clients.

``SyncHTTPClient._submit`` (``_bentoml_impl/client/http.py``) closes its files through
``self._opened_files``, an attribute the client no longer has (they moved to
``self._file_manager``), so every ``client.<task>.submit(...)`` raises AttributeError
after the server accepted the task. ``AsyncHTTPClient`` is not affected. A user of the sync
client adds the same one line to their own code (docs/api.md); the server needs nothing.
No longer needed when ``_submit`` calls ``self._file_manager.close()``;
``tests/unit/test_bentoml_defects.py`` shows whether it does.
"""

from __future__ import annotations


def let_the_sync_client_submit_tasks() -> None:
    from _bentoml_impl.client.http import SyncHTTPClient

    if "_opened_files" not in SyncHTTPClient.__dict__:
        SyncHTTPClient._opened_files = property(  # type: ignore[attr-defined]
            lambda self: self._file_manager._opened_files
        )
