"""Hides packages from a test's subprocess, as if they were not installed.

With this folder on ``PYTHONPATH``, every module named in ``ATTENTION_UNET_HIDE`` (comma-separated
top-level names) is set to ``None`` in ``sys.modules`` at start-up: importing it raises
``ModuleNotFoundError`` and ``importlib.util.find_spec`` returns ``None``. Subprocesses inherit
the environment, so a command's own workers see the same install.
"""

import os
import sys

for _name in filter(None, os.environ.get("ATTENTION_UNET_HIDE", "").split(",")):
    sys.modules[_name.strip()] = None
