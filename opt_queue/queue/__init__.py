"""Celery and kombu: the app and its settings (app), task messages, row leases and the recovery of lost
rows (broker), the Redis transport (transport).
"""
