"""The `opt-queue` command (commands), its terminal display (ui) and the demo (demo).
"""
