"""The Redis ledger: shared by every gateway process and replica.

Each operation is one Lua script (``EVALSHA``, so one round trip, executed atomically).
All of a tenant's keys carry the hash tag ``{tenant}``, so they live in one Redis Cluster
slot and a script touches a single node:

- ``jg:{T}:b:<window>:<period start>`` — hash ``spent``, ``reserved``, ``granted``; it
  expires on its own some time after its period ends;
- ``jg:{T}:r:<request id>`` — hash ``joules``, ``periods`` (the bucket keys it holds),
  ``factors`` (each bucket's ledger amount per joule, :class:`~.ledger.Limit`; absent: 1),
  ``state``, ``expires_at``; expires on its own too;
- ``jg:{T}:active`` — sorted set of active reservations by expiry; the tenant's next
  reservation (or status read) returns the stale ones to the budget in the same script.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, cast

from .ledger import Ledger, LedgerUnavailable, Limit, Reservation, WindowState
from .windows import period

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript
    from redis.typing import EncodableT

#: One of the scripts' replies: an array of Redis integers and bulk strings.
_Array = list[int | bytes]

#: How long buckets and finished reservations outlive their period (late settles, audits).
_KEEP_S = 40 * 86400

# A reservation's per-bucket factors ('a;b;...'; absent: every bucket 1).
_FACTORS = """
local function factors_of(raw)
  local out = {}
  if raw then for f in string.gmatch(raw, '[^;]+') do out[#out + 1] = tonumber(f) end end
  return out
end
"""

# Returns stale active reservations of the tenant (KEYS[1] = its active set) to the budget.
# ARGV[1] = now, ARGV[2] = key prefix "jg:{T}:".
_EXPIRE = _FACTORS + """
local function expire_stale(active, now, prefix)
  local stale = redis.call('ZRANGEBYSCORE', active, '-inf', now)
  for _, rid in ipairs(stale) do
    local rkey = prefix .. 'r:' .. rid
    local r = redis.call('HMGET', rkey, 'joules', 'periods', 'state', 'factors')
    if r[3] == 'active' then
      local f, n = factors_of(r[4]), 0
      for bkey in string.gmatch(r[2], '[^;]+') do
        n = n + 1
        local held = tonumber(r[1]) * (f[n] or 1)
        if tonumber(redis.call('HINCRBYFLOAT', bkey, 'reserved', -held)) < 1e-9 then
          redis.call('HSET', bkey, 'reserved', 0)
        end
      end
      redis.call('HSET', rkey, 'state', 'expired')
    end
    redis.call('ZREM', active, rid)
  end
  return #stale
end
"""

# KEYS: active set, reservation key, bucket keys...
# ARGV: now, prefix, joules, ttl, keep, request id, then per bucket: limit, period end,
# factor (ledger amount per joule).
_RESERVE = _EXPIRE + """
local now, prefix = tonumber(ARGV[1]), ARGV[2]
local joules, ttl, keep, rid = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
expire_stale(KEYS[1], now, prefix)
if redis.call('EXISTS', KEYS[2]) == 1 then return {-1} end
local out, short = {}, 0
for i = 3, #KEYS do
  local limit = tonumber(ARGV[7 + (i - 3) * 3])
  local need = joules * tonumber(ARGV[9 + (i - 3) * 3])
  local v = redis.call('HMGET', KEYS[i], 'spent', 'reserved', 'granted')
  local spent, reserved, granted = tonumber(v[1] or 0), tonumber(v[2] or 0), tonumber(v[3] or 0)
  out[#out + 1] = tostring(spent); out[#out + 1] = tostring(reserved); out[#out + 1] = tostring(granted)
  if short == 0 and limit + granted - spent - reserved < need then short = i - 2 end
end
if short > 0 then return {0, short, unpack(out)} end
local held, factors = {}, {}
for i = 3, #KEYS do
  local factor = ARGV[9 + (i - 3) * 3]
  redis.call('HINCRBYFLOAT', KEYS[i], 'reserved', joules * tonumber(factor))
  redis.call('EXPIREAT', KEYS[i], math.floor(tonumber(ARGV[8 + (i - 3) * 3]) + keep))
  held[#held + 1] = KEYS[i]
  factors[#factors + 1] = factor
end
redis.call('HSET', KEYS[2], 'joules', tostring(joules), 'periods', table.concat(held, ';'),
           'factors', table.concat(factors, ';'), 'state', 'active',
           'expires_at', tostring(now + ttl))
redis.call('EXPIRE', KEYS[2], math.ceil(ttl + keep))
redis.call('ZADD', KEYS[1], now + ttl, rid)
return {1, 0, unpack(out)}
"""

# KEYS: reservation key, active set.  ARGV: spent joules ('' = release), request id.
_FINISH = _FACTORS + """
local r = redis.call('HMGET', KEYS[1], 'joules', 'periods', 'state', 'factors')
if not r[3] or r[3] == 'settled' or r[3] == 'released' then return 0 end
local f, n = factors_of(r[4]), 0
for bkey in string.gmatch(r[2], '[^;]+') do
  n = n + 1
  local factor = f[n] or 1
  if r[3] == 'active' then
    if tonumber(redis.call('HINCRBYFLOAT', bkey, 'reserved', -(tonumber(r[1]) * factor))) < 1e-9 then
      redis.call('HSET', bkey, 'reserved', 0)
    end
  end
  if ARGV[1] ~= '' then
    if factor == 1 then redis.call('HINCRBYFLOAT', bkey, 'spent', ARGV[1])
    else redis.call('HINCRBYFLOAT', bkey, 'spent', tonumber(ARGV[1]) * factor) end
  end
end
redis.call('HSET', KEYS[1], 'state', ARGV[1] ~= '' and 'settled' or 'released')
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
"""

# KEYS: reservation key, bucket keys...  ARGV: joules, keep, then per bucket: period end,
# factor.
_RECORD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local held, factors = {}, {}
for i = 2, #KEYS do
  local factor = ARGV[4 + (i - 2) * 2]
  if tonumber(factor) == 1 then redis.call('HINCRBYFLOAT', KEYS[i], 'spent', ARGV[1])
  else redis.call('HINCRBYFLOAT', KEYS[i], 'spent', tonumber(ARGV[1]) * tonumber(factor)) end
  redis.call('EXPIREAT', KEYS[i], math.floor(tonumber(ARGV[3 + (i - 2) * 2]) + tonumber(ARGV[2])))
  held[#held + 1] = KEYS[i]
  factors[#factors + 1] = factor
end
redis.call('HSET', KEYS[1], 'joules', ARGV[1], 'periods', table.concat(held, ';'),
           'factors', table.concat(factors, ';'), 'state', 'settled')
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2])))
return 1
"""

# KEYS: active set, bucket keys...  ARGV: now, prefix.
_STATUS = _EXPIRE + """
expire_stale(KEYS[1], tonumber(ARGV[1]), ARGV[2])
local out = {}
for i = 2, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'spent', 'reserved', 'granted')
  out[#out + 1] = tostring(tonumber(v[1] or 0)); out[#out + 1] = tostring(tonumber(v[2] or 0))
  out[#out + 1] = tostring(tonumber(v[3] or 0))
end
return out
"""

# KEYS: active set.  ARGV: now, prefix.
_EXPIRE_ONLY = _EXPIRE + "return expire_stale(KEYS[1], tonumber(ARGV[1]), ARGV[2])"

# KEYS: bucket keys.  ARGV: field, value ('reset' sets spent and granted to 0), expire-at.
_ADJUST = """
for i = 1, #KEYS do
  if ARGV[1] == 'reset' then
    redis.call('HSET', KEYS[i], 'spent', 0, 'granted', 0)
  else
    redis.call('HINCRBYFLOAT', KEYS[i], ARGV[1], ARGV[2])
  end
  redis.call('EXPIREAT', KEYS[i], math.floor(tonumber(ARGV[3])))
end
return #KEYS
"""


def _prefix(tenant: str) -> str:
    return f"jg:{{{tenant}}}:"


class RedisLedger(Ledger):
    def __init__(self, url: str, timeout_s: float = 2.0, max_connections: int = 64):
        import redis.asyncio as aioredis

        self._errors = (aioredis.ConnectionError, aioredis.TimeoutError)
        # A blocking pool: a burst beyond max_connections waits (up to timeout_s) for a free
        # connection; redis-py's default pool refuses it ("Too many connections") instead.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout_s,
            socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._pool = pool
        self._redis = aioredis.Redis(connection_pool=pool)
        register = self._redis.register_script
        self._reserve, self._finish, self._status = register(_RESERVE), register(_FINISH), \
            register(_STATUS)
        self._expire, self._adjust = register(_EXPIRE_ONLY), register(_ADJUST)
        self._record = register(_RECORD)

    async def _call(self, script: AsyncScript, keys: list[str],
                    args: Sequence[EncodableT]) -> object:
        try:
            return await script(keys=keys, args=args)
        except self._errors as exc:
            raise LedgerUnavailable(f"redis: {exc}") from None

    async def _call_int(self, script: AsyncScript, keys: list[str],
                        args: Sequence[EncodableT]) -> int:
        """A script that returns a Redis integer."""
        return cast(int, await self._call(script, keys, args))

    async def _call_array(self, script: AsyncScript, keys: list[str],
                          args: Sequence[EncodableT]) -> _Array:
        """A script that returns an array (integers and numbers as bulk strings)."""
        return cast(_Array, await self._call(script, keys, args))

    def _buckets(self, tenant: str, limits: list[Limit],
                 now: float) -> Iterator[tuple[str, Limit, int, int]]:
        prefix = _prefix(tenant)
        for limit in limits:
            start, end = period(limit.window, now)
            yield f"{prefix}b:{limit.window}:{start}", limit, start, end

    async def reserve(self, tenant: str, request_id: str, joules: float, limits: list[Limit],
                      ttl_s: float, now: float | None = None) -> Reservation:
        now = time.time() if now is None else now
        prefix = _prefix(tenant)
        buckets = list(self._buckets(tenant, limits, now))
        args: list[EncodableT] = [now, prefix, joules, ttl_s, _KEEP_S, request_id]
        for _, limit, _, end in buckets:
            args += [limit.joules, end, repr(float(limit.factor))]
        out = await self._call_array(
            self._reserve, [prefix + "active", f"{prefix}r:{request_id}", *(b[0] for b in buckets)],
            args)
        code, short = int(out[0]), int(out[1]) if len(out) > 1 else 0
        if code == -1:
            raise ValueError(f"request id {request_id!r} already has a reservation")
        states = [WindowState(limit.window, start, end, limit.joules,
                              float(out[2 + 3 * i]), float(out[3 + 3 * i]), float(out[4 + 3 * i]),
                              limit.factor, limit.unit)
                  for i, (_, limit, start, end) in enumerate(buckets)]
        if code == 0:
            return Reservation(False, request_id, joules, states, states[short - 1])
        for state in states:
            state.reserved += joules * state.factor
        return Reservation(True, request_id, joules, states)

    async def _done(self, tenant: str, request_id: str, spend: str) -> bool:
        prefix = _prefix(tenant)
        out = await self._call_int(self._finish, [f"{prefix}r:{request_id}", prefix + "active"],
                                   [spend, request_id])
        return int(out) == 1

    async def settle(self, tenant: str, request_id: str, joules: float) -> bool:
        return await self._done(tenant, request_id, repr(max(float(joules), 0.0)))

    async def release(self, tenant: str, request_id: str) -> bool:
        return await self._done(tenant, request_id, "")

    async def record(self, tenant: str, request_id: str, joules: float, limits: list[Limit],
                     now: float) -> bool:
        prefix = _prefix(tenant)
        buckets = list(self._buckets(tenant, limits, now))
        per_bucket: list[EncodableT] = []
        for _, limit, _, end in buckets:
            per_bucket += [end, repr(float(limit.factor))]
        out = await self._call_int(self._record,
                                   [f"{prefix}r:{request_id}", *(b[0] for b in buckets)],
                                   [repr(float(joules)), _KEEP_S, *per_bucket])
        return int(out) == 1

    async def status(self, tenant: str, limits: list[Limit],
                     now: float | None = None) -> list[WindowState]:
        now = time.time() if now is None else now
        prefix = _prefix(tenant)
        buckets = list(self._buckets(tenant, limits, now))
        out = await self._call_array(self._status, [prefix + "active", *(b[0] for b in buckets)],
                                     [now, prefix])
        return [WindowState(limit.window, start, end, limit.joules, float(out[3 * i]),
                            float(out[3 * i + 1]), float(out[3 * i + 2]), limit.factor, limit.unit)
                for i, (_, limit, start, end) in enumerate(buckets)]

    async def _adjust_current(self, tenant: str, windows: list[str], field: str, value: float,
                              now: float | None) -> None:
        now = time.time() if now is None else now
        buckets = list(self._buckets(tenant, [Limit(w, 0.0) for w in windows], now))
        for key, _, _, end in buckets:
            await self._call(self._adjust, [key], [field, value, end + _KEEP_S])

    async def grant(self, tenant: str, window: str, joules: float, now: float | None = None) -> None:
        await self._adjust_current(tenant, [window], "granted", joules, now)

    async def reset(self, tenant: str, windows: list[str], now: float | None = None) -> None:
        await self._adjust_current(tenant, windows, "reset", 0.0, now)

    async def expire(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        count = 0
        try:
            async for key in self._redis.scan_iter(match="jg:{*}:active", count=500):
                key = key.decode()
                count += await self._call_int(self._expire, [key], [now, key[:-len("active")]])
        except self._errors as exc:
            raise LedgerUnavailable(f"redis: {exc}") from None
        return count

    async def close(self) -> None:
        await self._redis.aclose()
        await self._pool.aclose()
