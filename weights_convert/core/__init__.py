"""The core: the model's parameter specification and the canonical checkpoint.

Nothing here imports a format, the harness or any framework; everything else builds on it.
"""
