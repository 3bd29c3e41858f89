"""The harness on top: the NumPy reference, parity, the bench, the image readers (``images``) and
the ``attention-unet`` command.

It runs the implementations, and imports each one only inside the function that runs it.
"""
