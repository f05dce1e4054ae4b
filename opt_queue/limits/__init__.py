"""The rate limits: each key's and group's windows, the budget's reservations and Redis' clock
(limiter), and the queues of rows waiting for a slot (admission).
"""
