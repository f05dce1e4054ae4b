"""Everything opt-queue keeps in Redis: every key name (keys), a job's state and its row scripts
(jobs), row leases (leases), a job's money (budget), the Lua scripts and their round trips
(scripts, lua/), connections (redis_conn).
"""
