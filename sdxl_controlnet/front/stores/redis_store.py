"""The job store every replica shares: jobs and their webhook outbox in Redis (7 or later)
or Valkey, through redis-py's asyncio client. What ``JOB_STORE_URL=redis://…`` gives.

Every change that reads and then writes is one Lua script, so it is atomic on the server
whatever the number of replicas; every script reads the time from the server (``TIME``),
so leases do not depend on the replicas' clocks agreeing. A full Redis refuses a script
whose first write would grow it: the scripts that end and delete jobs write first what
frees memory, so a full store can still empty itself. The keys, under ``KEY_PREFIX``:

- ``job:<task_id>``, a hash: the job's fields, input and secret. An ended job's is deleted
  ``RETENTION_S`` after it ended, by the next submit.
- ``pending``, a sorted set of waiting jobs by the time they were submitted: the line.
- ``running``, a sorted set of running jobs by the end of their lease.
- ``ended``, a sorted set of ended jobs by the time they ended, for their deletion.
- ``held_bytes``: what the jobs' inputs and results take, for ``JOB_STORE_MAX_BYTES``.
- ``outbox:message``, ``outbox:owner`` (hashes) and ``outbox:lease`` (a sorted set): each
  webhook delivery under way, the worker that holds it, and when its lease ends.

Redis must keep its data (appendonly) and never evict it (``maxmemory-policy noeviction``):
``open`` warns where it does not. One Redis or a primary with replicas; not Redis Cluster
(the scripts touch keys of several slots).
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
import typing as t
from dataclasses import asdict
from urllib.parse import urlsplit

import redis
import redis.asyncio

from ... import logs
from ...errors import StoreUnreachable
from ...settings import settings
from ..jobs import (
    PENDING,
    RETENTION_S,
    Claimed,
    Job,
    JobStore,
    StoreUnavailable,
    lapsed_failure,
    queue_full,
    store_full,
)
from ..outbox import Message, Outbox

logger = logs.logger(__name__)

KEY_PREFIX = "sdxl_controlnet:"
MIN_VERSION = (7, 0)  # ZRANGE … BYSCORE, and scripts that read TIME before they write
# A call the server has not answered within this long fails (the runner tries again).
TIMEOUT_S = 10.0
# How long a start waits for a Redis that does not answer yet (started beside the front).
OPEN_WAIT_S, OPEN_RETRY_S = 30.0, 1.0
# When a client refused for an unreachable store may try again.
UNREACHABLE_RETRY_AFTER_S = 5
# Ended jobs a submit deletes at most, so that no script holds the server for long.
CLEANUP_BATCH = 100
# Job's fields, in its order, as the hash holds them.
FIELDS = (
    "status",
    "created_at",
    "executed_at",
    "completed_at",
    "attempt",
    "step",
    "total",
    "preview_step",
    "preview",
    "outcome",
    "webhook",
)

# Every script starts by reading the server's clock.
_NOW = "local clock = redis.call('TIME')\nlocal now = clock[1] + clock[2] / 1000000\n"

# KEYS: pending, held_bytes, ended. ARGV: prefix, task_id, input, secret ('' for none),
# JOB_QUEUE_MAX, JOB_STORE_MAX_BYTES, RETENTION_S, CLEANUP_BATCH.
_SUBMIT = (
    _NOW
    + """
local old = redis.call('ZRANGE', KEYS[3], '-inf', now - ARGV[7], 'BYSCORE', 'LIMIT', 0, ARGV[8])
for _, id in ipairs(old) do
  local key = ARGV[1] .. 'job:' .. id
  local size = redis.call('HSTRLEN', key, 'input') + redis.call('HSTRLEN', key, 'outcome')
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[3], id)
  redis.call('DECRBY', KEYS[2], size)
end
local waiting = redis.call('ZCARD', KEYS[1])
if waiting >= tonumber(ARGV[5]) then return {'queue_full', waiting} end
local held = tonumber(redis.call('GET', KEYS[2]) or '0')
if held + #ARGV[3] > tonumber(ARGV[6]) then return {'store_full', held} end
local key = ARGV[1] .. 'job:' .. ARGV[2]
redis.call('HSET', key, 'status', 'pending', 'created_at', now, 'attempt', 0, 'input', ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', key, 'secret', ARGV[4]) end
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('INCRBY', KEYS[2], #ARGV[3])
return {'ok', waiting + 1}
"""
)

# KEYS: pending, running, ended, held_bytes. ARGV: prefix, owner, JOB_CONCURRENCY,
# JOB_LEASE_S, JOB_MAX_ATTEMPTS, the failure of a job out of attempts (JSON).
# Returns the claimed task id ('' for none), then the ids of the jobs it failed.
_CLAIM = (
    _NOW
    + """
local claimed = {''}
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], '-inf', '(' .. now, 'BYSCORE')) do
  local key = ARGV[1] .. 'job:' .. id
  redis.call('ZREM', KEYS[2], id)
  redis.call('HDEL', key, 'owner', 'lease_until', 'preview')
  if tonumber(redis.call('HGET', key, 'attempt')) >= tonumber(ARGV[5]) then
    redis.call('HSET', key, 'status', 'failed', 'completed_at', now, 'outcome', ARGV[6])
    redis.call('INCRBY', KEYS[4], #ARGV[6])
    redis.call('ZADD', KEYS[3], now, id)
    table.insert(claimed, id)
  else
    redis.call('HSET', key, 'status', 'pending')
    redis.call('ZADD', KEYS[1], redis.call('HGET', key, 'created_at'), id)
  end
end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return claimed end
local first = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
if not first then return claimed end
local key = ARGV[1] .. 'job:' .. first
redis.call('ZREM', KEYS[1], first)
redis.call('ZADD', KEYS[2], now + ARGV[4], first)
redis.call('HSET', key, 'status', 'in_progress', 'owner', ARGV[2], 'executed_at', now)
redis.call('HINCRBY', key, 'attempt', 1)
redis.call('HDEL', key, 'step', 'total', 'preview')
claimed[1] = first
return claimed
"""
)

# KEYS: the job, running. ARGV: task_id, owner, renew ('1' or '0'), JOB_LEASE_S.
# The job's status; nil where it is not, or no longer, the owner's.
_WATCH = (
    _NOW
    + """
local status, owner = unpack(redis.call('HMGET', KEYS[1], 'status', 'owner'))
if not status then return nil end
if status == 'pending' or status == 'in_progress' then
  if owner ~= ARGV[2] then return nil end
  if ARGV[3] == '1' then redis.call('ZADD', KEYS[2], 'XX', now + ARGV[4], ARGV[1]) end
end
return status
"""
)

# KEYS: the job. ARGV: field, value, … : set on a running job only.
_RECORD = """
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# KEYS: the job. ARGV: field, value: set on a job still kept (a late delivery's report
# never brings a deleted job back).
_RECORD_KEPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# KEYS: the job, running, ended, held_bytes. ARGV: task_id, owner, status, outcome ('' for
# none).
_END = (
    _NOW
    + """
local status, owner = unpack(redis.call('HMGET', KEYS[1], 'status', 'owner'))
if status ~= 'in_progress' or owner ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'completed_at', now)
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'outcome', ARGV[4])
  redis.call('INCRBY', KEYS[4], #ARGV[4])
end
redis.call('HDEL', KEYS[1], 'owner', 'preview')
redis.call('ZADD', KEYS[3], now, ARGV[1])
return 1
"""
)

# KEYS: the job, pending, running. ARGV: task_id, owner, counted ('1' or '0').
_REQUEUE = """
local status, owner = unpack(redis.call('HMGET', KEYS[1], 'status', 'owner'))
if status ~= 'in_progress' or owner ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'pending')
redis.call('HDEL', KEYS[1], 'owner', 'step', 'total', 'preview')
if ARGV[3] == '0' then redis.call('HINCRBY', KEYS[1], 'attempt', -1) end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[2], redis.call('HGET', KEYS[1], 'created_at'), ARGV[1])
return 1
"""

# KEYS: the job, pending, running, ended. ARGV: task_id. The status before (nil: unknown).
_CANCEL = (
    _NOW
    + """
local before = redis.call('HGET', KEYS[1], 'status')
if before == 'pending' or before == 'in_progress' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'completed_at', now)
  redis.call('HDEL', KEYS[1], 'owner', 'preview')
  redis.call('ZADD', KEYS[4], now, ARGV[1])
end
return before
"""
)

# KEYS: outbox:message, outbox:lease, outbox:owner. ARGV: owner, lease_s (0: released),
# then message id and message, for each.
_HOLD = (
    _NOW
    + """
local lease_until = 0
if tonumber(ARGV[2]) > 0 then lease_until = now + ARGV[2] end
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[1])
  redis.call('ZADD', KEYS[2], lease_until, ARGV[i])
end
return (#ARGV - 2) / 2
"""
)

# KEYS: outbox:lease, outbox:owner. ARGV: owner, lease_s.
_RENEW = (
    _NOW
    + """
local held = redis.call('HGETALL', KEYS[2])
for i = 1, #held, 2 do
  if held[i + 1] == ARGV[1] then redis.call('ZADD', KEYS[1], 'XX', now + ARGV[2], held[i]) end
end
return 0
"""
)

# KEYS: outbox:message, outbox:lease, outbox:owner. ARGV: owner, lease_s, limit.
# The adopted messages.
_ADOPT = (
    _NOW
    + """
local adopted = {}
local lapsed = redis.call('ZRANGE', KEYS[2], '-inf', '(' .. now, 'BYSCORE', 'LIMIT', 0, ARGV[3])
for _, id in ipairs(lapsed) do
  redis.call('ZADD', KEYS[2], now + ARGV[2], id)
  redis.call('HSET', KEYS[3], id, ARGV[1])
  table.insert(adopted, redis.call('HGET', KEYS[1], id))
end
return adopted
"""
)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _number(value: bytes | None, kind: type = float) -> t.Any:
    return None if value is None else kind(float(value))


def _job(task_id: str, values: list[bytes | None], rank: int | None) -> Job | None:
    status, created, executed, completed, attempt, step, total, preview_step, *texts = values
    if status is None:
        return None
    return Job(
        task_id,
        status.decode(),
        _number(created),
        _number(executed),
        _number(completed),
        _number(attempt, int) or 0,
        None if rank is None or status != PENDING.encode() else rank + 1,
        _number(step, int),
        _number(total, int),
        _number(preview_step, int),
        *map(_text, texts),
    )


def redacted(url: str) -> str:
    """``url`` without its password, for messages and logs: the one in it masked, and its
    query left out (redis-py also reads ``?password=`` there)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    return f"{parts.scheme}://{netloc}{parts.path}"


class RedisJobStore(JobStore):
    """Jobs in the Redis or Valkey at ``url``, shared by every replica that names it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = redis.asyncio.Redis.from_url(
            url, socket_connect_timeout=TIMEOUT_S, socket_timeout=TIMEOUT_S
        )
        self.outbox = RedisOutbox(self.client)
        key = self.key
        self.pending, self.running, self.ended = key("pending"), key("running"), key("ended")
        self.held_bytes = key("held_bytes")
        script = self.client.register_script
        self._submit, self._claim, self._watch = script(_SUBMIT), script(_CLAIM), script(_WATCH)
        self._record, self._end, self._requeue = script(_RECORD), script(_END), script(_REQUEUE)
        self._record_kept, self._cancel = script(_RECORD_KEPT), script(_CANCEL)

    @staticmethod
    def key(name: str) -> str:
        return KEY_PREFIX + name

    def job_key(self, task_id: str) -> str:
        return self.key(f"job:{task_id}")

    def open(self) -> None:
        """Check that the server answers, within ``OPEN_WAIT_S`` (it may be starting beside
        the front), and is recent enough; warn where it may lose jobs: it evicts keys, or
        keeps no append-only file."""
        where = f"JOB_STORE_URL {redacted(self.url)}"
        deadline = time.monotonic() + OPEN_WAIT_S
        while True:
            try:
                with redis.Redis.from_url(self.url, socket_connect_timeout=TIMEOUT_S) as client:
                    server, memory = client.info("server"), client.info("memory")
                    persistence = client.info("persistence")
                break
            except redis.RedisError as exc:
                starting = isinstance(exc, redis.ConnectionError | redis.TimeoutError)
                if isinstance(exc, redis.AuthenticationError) or not starting:
                    raise StoreUnavailable(f"{where} refused the front ({exc})") from exc
                if time.monotonic() > deadline:
                    raise StoreUnavailable(
                        f"{where} cannot be reached ({exc}): start Redis or Valkey there, or "
                        "leave JOB_STORE_URL empty for the embedded one-host store"
                    ) from exc
                logger.info("waiting for %s to answer (%s)", where, exc)
                time.sleep(OPEN_RETRY_S)
        version = tuple(int(part) for part in str(server["redis_version"]).split(".")[:2])
        if version < MIN_VERSION:
            raise StoreUnavailable(
                f"{where} runs Redis {server['redis_version']}; jobs need Redis 7 or later, "
                "or Valkey"
            )
        if memory.get("maxmemory_policy", "noeviction") != "noeviction":
            logger.warning(
                "%s evicts keys (maxmemory-policy %s): it may drop jobs; set it to noeviction",
                where,
                memory["maxmemory_policy"],
            )
        if not persistence.get("aof_enabled"):
            logger.warning(
                "%s keeps no append-only file: jobs since its last snapshot are lost if it "
                "restarts; set appendonly yes",
                where,
            )

    @contextlib.asynccontextmanager
    async def _reaching(self) -> t.AsyncIterator[None]:
        """Redis's failures (unreachable, timed out, out of memory) as ``StoreUnreachable``:
        a 503 that asks the client to retry, the cause in the log."""
        try:
            yield
        except redis.RedisError as exc:
            logger.error("jobs: %s failed: %r", redacted(self.url), exc)
            raise StoreUnreachable(
                "the job store is unavailable; retry in a few seconds",
                retry_after_s=UNREACHABLE_RETRY_AFTER_S,
            ) from exc

    async def _run(self, script: t.Any, keys: list[str], args: list[t.Any]) -> t.Any:
        async with self._reaching():
            return await script(keys=keys, args=args)

    async def counts(self) -> tuple[int, int]:
        async with self.client.pipeline(transaction=False) as pipe, self._reaching():
            pipe.zcard(self.pending).zcard(self.running)
            waiting, running = await pipe.execute()
        return waiting, running

    async def submit(self, task_id: str, input: bytes, secret: str | None) -> Job:
        keys = [self.pending, self.held_bytes, self.ended]
        limits = (settings.job_queue_max, settings.job_store_max_bytes)
        args = [KEY_PREFIX, task_id, input, secret or "", *limits, RETENTION_S, CLEANUP_BATCH]
        answer, count = await self._run(self._submit, keys, args)
        if answer == b"queue_full":
            raise queue_full(count, settings.job_queue_max) or AssertionError(count)
        if answer == b"store_full":
            raise store_full()
        job = await self.get(task_id)
        assert job is not None, "stored above"
        return job

    async def _read(self, task_id: str, *extra: str) -> tuple[Job | None, list[bytes | None]]:
        async with self.client.pipeline(transaction=True) as pipe, self._reaching():
            pipe.hmget(self.job_key(task_id), *FIELDS, *extra).zrank(self.pending, task_id)
            values, rank = await pipe.execute()
        return _job(task_id, values[: len(FIELDS)], rank), values[len(FIELDS) :]

    async def get(self, task_id: str) -> Job | None:
        return (await self._read(task_id))[0]

    async def source(self, task_id: str) -> Claimed | None:
        job, (input, secret) = await self._read(task_id, "input", "secret")
        return None if job is None or input is None else Claimed(job, input, _text(secret))

    async def claim(self, owner: str) -> tuple[Claimed | None, list[Claimed]]:
        failure = json.dumps(lapsed_failure(settings.job_max_attempts))
        settings_ = (settings.job_concurrency, settings.job_lease_s, settings.job_max_attempts)
        first, *failed = await self._run(
            self._claim,
            [self.pending, self.running, self.ended, self.held_bytes],
            [KEY_PREFIX, owner, *settings_, failure],
        )
        ended = [c for task_id in failed if (c := await self.source(task_id.decode()))]
        return (await self.source(first.decode()) if first else None), ended

    async def watch(self, task_id: str, owner: str, renew: bool) -> str | None:
        keys = [self.job_key(task_id), self.running]
        args = [task_id, owner, int(renew), settings.job_lease_s]
        status = await self._run(self._watch, keys, args)
        return _text(status)

    async def record_step(self, task_id: str, step: int, total: int) -> None:
        await self._run(self._record, [self.job_key(task_id)], ["step", step, "total", total])

    async def record_preview(self, task_id: str, step: int, image: str) -> None:
        """Keep the latest preview only: a job's hash never grows with its steps."""
        args = ["preview_step", step, "preview", image]
        await self._run(self._record, [self.job_key(task_id)], args)

    async def record_webhook(self, task_id: str, state: str) -> None:
        await self._run(self._record_kept, [self.job_key(task_id)], ["webhook", state])

    async def end(self, task_id: str, owner: str, status: str, outcome: t.Any = None) -> bool:
        encoded = "" if outcome is None else json.dumps(outcome, separators=(",", ":"))
        keys = [self.job_key(task_id), self.running, self.ended, self.held_bytes]
        return bool(await self._run(self._end, keys, [task_id, owner, status, encoded]))

    async def requeue(self, task_id: str, owner: str, counted: bool = False) -> bool:
        keys = [self.job_key(task_id), self.pending, self.running]
        return bool(await self._run(self._requeue, keys, [task_id, owner, int(counted)]))

    async def cancel(self, task_id: str) -> tuple[Job | None, str | None]:
        keys = [self.job_key(task_id), self.pending, self.running, self.ended]
        before = await self._run(self._cancel, keys, [task_id])
        return await self.get(task_id), _text(before)


class RedisOutbox(Outbox):
    """The deliveries of every replica's workers, beside the jobs in Redis."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        key = RedisJobStore.key
        self.messages, self.leases = key("outbox:message"), key("outbox:lease")
        self.owners = key("outbox:owner")
        script = client.register_script
        self._hold, self._renew, self._adopt = script(_HOLD), script(_RENEW), script(_ADOPT)

    @staticmethod
    def _packed(message: Message) -> str:
        fields = {**asdict(message), "body": base64.b64encode(message.body).decode()}
        return json.dumps(fields)

    @staticmethod
    def _unpacked(packed: bytes) -> Message:
        fields = json.loads(packed)
        return Message(**{**fields, "body": base64.b64decode(fields["body"])})

    async def hold(self, messages: t.Sequence[Message], owner: str, lease_s: float) -> int:
        if not messages:
            return 0
        pairs = [part for m in messages for part in (m.message_id, self._packed(m))]
        keys = [self.messages, self.leases, self.owners]
        return int(await self._hold(keys=keys, args=[owner, lease_s, *pairs]))

    async def drop(self, message_id: str) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hdel(self.messages, message_id).hdel(self.owners, message_id)
            await pipe.zrem(self.leases, message_id).execute()

    async def renew(self, owner: str, lease_s: float) -> None:
        await self._renew(keys=[self.leases, self.owners], args=[owner, lease_s])

    async def adopt(self, owner: str, lease_s: float, limit: int) -> list[Message]:
        keys = [self.messages, self.leases, self.owners]
        packed = await self._adopt(keys=keys, args=[owner, lease_s, limit])
        return [self._unpacked(p) for p in packed]
