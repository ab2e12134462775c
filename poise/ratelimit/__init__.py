"""Rate limits whose state lives outside one worker's memory.

- :mod:`poise.ratelimit.redis_store`: global limits shared by every poise instance
  through Redis (extra ``poise[redis]``), spent locally from the token leases of
  :mod:`poise.core.leases`; :mod:`poise.ratelimit.gcra_script` is what runs in Redis.
- :mod:`poise.ratelimit.shared`: the memory the workers of one poise share for local
  limits (:mod:`poise.core.ratelimit`) and connection counts.
"""
