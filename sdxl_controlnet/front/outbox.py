"""Webhook deliveries under way, kept beside the jobs they tell of (``webhooks.py``
delivers them). Each is leased to the worker delivering it: a worker renews its leases while
it lives; a worker that died (a SIGKILL, an OOM kill) lets them lapse, and another worker
adopts its deliveries, each with its ``webhook-id``, tries made and next try. A graceful
stop releases them at once.

Each job store (``stores/``) has its outbox, in the same engine: a file beside the embedded
store, or keys beside the jobs in Redis.
"""

from __future__ import annotations

import abc
import typing as t
from dataclasses import dataclass


@dataclass
class Message:
    """One delivery: its body, built once for every try, and how far it has got."""

    message_id: str
    url: str
    body: bytes
    secret: str
    tries: int = 0  # tries made
    next_at: float = 0.0  # when the next try is due (time.time())


class Outbox(abc.ABC):
    """Where a webhook's deliveries wait, leased to the worker delivering them."""

    @abc.abstractmethod
    async def hold(self, messages: t.Sequence[Message], owner: str, lease_s: float) -> int:
        """Keep ``messages``, leased to ``owner`` for ``lease_s`` (0: released); how many."""

    @abc.abstractmethod
    async def drop(self, message_id: str) -> None: ...

    @abc.abstractmethod
    async def renew(self, owner: str, lease_s: float) -> None:
        """Extend the lease of every delivery ``owner`` holds."""

    @abc.abstractmethod
    async def adopt(self, owner: str, lease_s: float, limit: int) -> list[Message]:
        """Up to ``limit`` deliveries whose lease lapsed or was released, leased to
        ``owner`` at once: one worker resumes each, and the rest wait for another."""
