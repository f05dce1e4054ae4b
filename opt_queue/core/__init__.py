"""What a job is made of, with no Redis and no network: requests and endpoints (request), answers and a
row's result (answers), output formats (formats), token counts (tokens), prices (prices), the config
(config) and the errors a user sees (errors).
"""
