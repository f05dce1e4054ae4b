"""The Batch API lane: chunks of rows written for batches (chunks), and the batches' submit side and
worker side (batchlane).
"""
