"""The Redis store: one key per debt, sorted sets for id order and due times, Lua for atomic writes.

Keys, all under the URL's `?prefix=` (default `compter:`):
  debt:{id}  the debt, as the codec's JSON
  ids        every debt's id, zero-padded, all scored 0 so that ZRANGEBYLEX orders them
             exactly (a float score would lose ids above 2^53)
  due        debt ids scored by due time (Unix seconds), for the watcher
  next_id    the counter for server-chosen ids, kept at or above the highest id ever stored
  lease      the watcher's lease: the holder's name, expiring on the server's clock

A write is an optimistic compare-and-set: read the debt, decide, then a Lua script
writes the debt and its indexes only if the debt is still the text that was read.
"""

import asyncio
import contextlib
import re
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from compter.errors import StoreUnavailable
from compter.model import MAX_ID, Debt, Transition
from compter.store import redact
from compter.store.base import Decide
from compter.store.codec import decode, due_timestamp, encode

DEFAULT_PREFIX = "compter:"
# Connect and read timeouts: a request answers 503 within seconds when Redis hangs (the URL may override them).
TIMEOUT_S = 2.0
# How long an update waits behind this process's other updates of the same debt before giving up.
LOCK_WAIT_S = 3.0
_ID_WIDTH = len(str(MAX_ID))
_BATCH = 1000

# KEYS: debt, due, ids, next_id. ARGV: the text read ('' for none), the text to write ('' to delete),
# the id, the zero-padded id, the due score ('' for never due). {1} if written; {0, the text now} if the
# debt changed since it was read, so that a retry needs no other read.
_COMPARE_AND_SET = """
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then return {0, current} end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[3])
  redis.call('ZREM', KEYS[3], ARGV[4])
  return {1}
end
redis.call('SET', KEYS[1], ARGV[2])
if ARGV[5] == '' then
  redis.call('ZREM', KEYS[2], ARGV[3])
else
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[3])
end
redis.call('ZADD', KEYS[3], 0, ARGV[4])
local highest = redis.call('GET', KEYS[4]) or '0'
if #ARGV[3] > #highest or (#ARGV[3] == #highest and ARGV[3] > highest) then
  redis.call('SET', KEYS[4], ARGV[3])
end
return {1}
"""

# KEYS: lease. ARGV: holder, ttl in ms. 1 if the holder has the lease now.
_HOLD_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""

# KEYS: lease. ARGV: holder. Deletes the lease only if the holder still has it.
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStore:
    shared = True

    def __init__(self, url: str) -> None:
        self._url = url
        parts = urlsplit(url)
        self._password = unquote(parts.password) if parts.password else None
        if not re.fullmatch(r"/?|/[0-9]+", parts.path):
            # redis-py would quietly use database 0 for any other path.
            raise ValueError(
                f"cannot use the redis store URL {redact(url)}: its path must be a database number, like /0"
            )
        options = parse_qsl(parts.query, keep_blank_values=True)
        prefix = dict(options).get("prefix", DEFAULT_PREFIX)
        driver_url = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in options if k != "prefix"])))
        # No automatic retries: resending a write whose answer was lost could apply it twice.
        # A pooled connection that died with the server is replaced when it is next taken.
        try:
            self._redis = Redis.from_url(
                driver_url,
                socket_timeout=TIMEOUT_S,
                socket_connect_timeout=TIMEOUT_S,
                retry=Retry(NoBackoff(), 0),
            )
            # Builds, without connecting, what every connection will be: a misspelt option fails here.
            pool = self._redis.connection_pool
            pool.connection_class(**pool.connection_kwargs)
        except (TypeError, ValueError) as error:
            raise ValueError(f"cannot use the redis store URL {redact(url)}: {error}") from None
        self._debt_prefix = f"{prefix}debt:"
        self._due_key = f"{prefix}due"
        self._ids_key = f"{prefix}ids"
        self._next_id_key = f"{prefix}next_id"
        self._lease_key = f"{prefix}lease"
        self._compare_and_set = self._redis.register_script(_COMPARE_AND_SET)
        self._hold_lease = self._redis.register_script(_HOLD_LEASE)
        self._release_lease = self._redis.register_script(_RELEASE_LEASE)
        self._locks: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()

    async def open(self) -> None:
        await self.ping()

    async def close(self) -> None:
        await self._redis.aclose()

    async def ping(self) -> None:
        with self._errors():
            await self._redis.ping()

    async def get(self, debt_id: int) -> Debt | None:
        with self._errors():
            text = await self._redis.get(self._debt_key(debt_id))
        return decode(text) if text is not None else None

    async def page(self, *, after: int = 0, limit: int | None = None) -> list[Debt]:
        debts: list[Debt] = []
        while limit is None or len(debts) < limit:
            count = _BATCH if limit is None else min(_BATCH, limit - len(debts))
            ids = await self._ids_after(after, count)
            debts.extend(await self._load(ids))
            if len(ids) < count:
                break
            after = ids[-1]
        return debts

    async def create(self, decide: Callable[[int], Transition]) -> Transition:
        while True:
            debt_id = await self._next_id()
            transition = decide(debt_id)
            # Taken only if a payment vivified this very id since the counter gave it out.
            if await self._write(debt_id, b"", transition.stored) is None:
                return transition

    async def update(self, debt_id: int, decide: Decide) -> Transition:
        async with self._serialised(debt_id):
            with self._errors():
                text = await self._redis.get(self._debt_key(debt_id)) or b""
            while True:
                transition = decide(decode(text) if text else None)
                if not transition.changed:
                    return transition
                current = await self._write(debt_id, text, transition.stored)
                if current is None:
                    return transition
                text = current

    async def due(self, now: datetime, limit: int) -> list[Debt]:
        with self._errors():
            members: list[bytes] = await self._redis.zrangebyscore(  # type: ignore[assignment]
                self._due_key, "-inf", now.timestamp(), start=0, num=limit
            )
        debts = await self._load([int(member) for member in members])
        # A debt paid between the two reads has moved on: not due any more.
        return [debt for debt in debts if debt.due is not None and debt.due <= now]

    async def next_due(self) -> datetime | None:
        with self._errors():
            first = await self._redis.zrange(self._due_key, 0, 0, withscores=True)
        return datetime.fromtimestamp(float(first[0][1]), UTC) if first else None

    async def hold_lease(self, holder: str, ttl_s: float) -> bool:
        with self._errors():
            held = await self._hold_lease(keys=[self._lease_key], args=[holder, max(1, round(ttl_s * 1000))])
        return bool(held)

    async def release_lease(self, holder: str) -> None:
        with self._errors():
            await self._release_lease(keys=[self._lease_key], args=[holder])

    def _debt_key(self, debt_id: int) -> str:
        return f"{self._debt_prefix}{debt_id}"

    async def _write(self, debt_id: int, read: bytes | str, stored: Debt | None) -> bytes | None:
        """Write `stored` (delete when None) if the debt is still the text `read` (b"": absent).

        None when written; else the debt's text now, which another writer changed.
        """
        due = due_timestamp(stored) if stored is not None else None
        with self._errors():
            outcome = await self._compare_and_set(
                keys=[self._debt_key(debt_id), self._due_key, self._ids_key, self._next_id_key],
                args=[
                    read,
                    encode(stored) if stored is not None else "",
                    str(debt_id),
                    _padded(debt_id),
                    repr(due) if due is not None else "",
                ],
            )
        return None if outcome[0] == 1 else bytes(outcome[1])

    async def _next_id(self) -> int:
        with self._errors():
            try:
                return int(await self._redis.incr(self._next_id_key))
            except ResponseError as error:
                if "overflow" not in str(error):
                    raise
        # The counter reached 2^63 - 1 (a debt was vivified there): take the lowest free id.
        return await self._lowest_free_id()

    async def _lowest_free_id(self) -> int:
        expected = 1
        while True:
            ids = await self._ids_after(expected - 1, _BATCH)
            for debt_id in ids:
                if debt_id != expected:
                    return expected
                expected += 1
            if len(ids) < _BATCH:
                return expected

    async def _ids_after(self, after: int, count: int) -> list[int]:
        with self._errors():
            # Past MAX_ID a padded id would grow a digit and sort wrong; nothing lies past it anyway.
            start = f"({_padded(min(after, MAX_ID))}"
            members = await self._redis.zrangebylex(self._ids_key, start, "+", start=0, num=count)
        return [int(member) for member in members]

    async def _load(self, ids: list[int]) -> list[Debt]:
        """The debts with these ids, in that order, skipping those deleted meanwhile."""
        if not ids:
            return []
        with self._errors():
            texts = await self._redis.mget([self._debt_key(debt_id) for debt_id in ids])
        return [decode(text) for text in texts if text is not None]

    @contextlib.asynccontextmanager
    async def _serialised(self, debt_id: int) -> AsyncIterator[None]:
        """One update of a debt at a time in this process, so that its writes do not keep failing each other."""
        lock = self._locks.get(debt_id)
        if lock is None:
            lock = self._locks[debt_id] = asyncio.Lock()
        try:
            async with asyncio.timeout(LOCK_WAIT_S):
                await lock.acquire()
        except TimeoutError:
            raise StoreUnavailable(
                f"the redis store {redact(self._url)} is too slow: debt {debt_id} waited {LOCK_WAIT_S:g} s for its turn"
            ) from None
        try:
            yield
        finally:
            lock.release()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn any driver or connection error into StoreUnavailable, with no password in it."""
        try:
            yield
        except (RedisError, OSError) as error:
            reason = str(error) or type(error).__name__
            if self._password:
                reason = reason.replace(self._password, "***")
            raise StoreUnavailable(f"the redis store {redact(self._url)} is unavailable: {reason}") from None


def _padded(debt_id: int) -> str:
    return str(debt_id).zfill(_ID_WIDTH)
