"""A worker's rows on its event loop: take a slot, call the API through a provider, act on the outcome
(the error policy), publish the result (engine); Prometheus metrics (metrics).
"""
