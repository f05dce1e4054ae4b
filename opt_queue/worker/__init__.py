"""The Celery task that runs a batch of rows on the worker's engine (tasks).
"""
