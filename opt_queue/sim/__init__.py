"""The simulated OpenAI-compatible API the demo, the tests and the benchmarks talk to: the synchronous
endpoints and their limits (api), the Files and Batches API (batch).
"""
