"""The GCRA script global rate limits run in Redis, and the keys it runs on.

:data:`SCRIPT` is GCRA for n tokens, atomic in Redis, with Redis' ``TIME`` as the
clock (so the instances' clocks need not agree).  ``KEYS[1]`` is the key; ``ARGV``
the emission interval in µs (``1e6 / rate``, may be fractional), the burst (integer
>= 1) and n (>= 1).  Per key Redis stores the TAT (theoretical arrival time, µs since
the epoch).  With ``tat = max(stored, now)`` and ``tau = (burst - 1) * interval`` it
grants ``k`` = as many of the n tokens as fit (``tat + k * interval - now <= burst *
interval``), stores ``tat + k * interval`` when ``k`` > 0 with an expiry at that TAT
(an idle key vanishes once it would be equivalent to absent), and returns ``{k,
wait_us}``: ``wait = (tat - now) - tau`` after the grant, how long until one more
token fits (0: one fits now).  A denial writes nothing.

Keys are ``poise:rl:<name>:<key>``: the limit's name percent-encoded (so no name can
make its keys collide with another limit's), the key's bytes as they are, or, beyond
:data:`LONG_KEY` bytes, ``#`` and their 128-bit xxh3 digest (Redis memory per key
stays bounded whatever a client sends).
"""

from __future__ import annotations

import hashlib
from urllib.parse import quote

import xxhash

# KEYS[1] the key; ARGV interval (µs, may be fractional), burst, n.  Times are µs as
# doubles: exact integers up to 2**53 µs (285 years), sub-µs rounding elsewhere.
# The TAT is written with %.17g: Redis turns Lua numbers into strings with 14 digits,
# which would drop the last µs digits of an epoch time.
SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local fit = math.floor((burst * interval - (tat - now)) / interval + 1e-9)
local granted = math.max(0, math.min(n, fit))
if granted > 0 then
  tat = tat + granted * interval
  redis.call('SET', KEYS[1], string.format('%.17g', tat),
             'PX', math.ceil((tat - now) / 1000) + 1)
end
local wait = tat - now - (burst - 1) * interval
if wait < 0 then wait = 0 end
return {granted, math.ceil(wait)}
"""
SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

LONG_KEY = 128


def key_prefix(name: str) -> bytes:
    """The prefix of the keys of the limit called ``name``."""
    return b"poise:rl:" + quote(name, safe="").encode() + b":"


def redis_key(prefix: bytes, key: bytes) -> bytes:
    """The Redis key of ``key`` under a limit's ``prefix``."""
    if len(key) > LONG_KEY:
        key = b"#" + xxhash.xxh3_128_hexdigest(key).encode()
    return prefix + key
