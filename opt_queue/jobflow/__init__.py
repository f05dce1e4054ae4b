"""A job from input file to output file: reading and writing JSONL (dataset), submit (producer),
collect (collector), run on one machine (runner, local), estimate, status, probe.
"""
