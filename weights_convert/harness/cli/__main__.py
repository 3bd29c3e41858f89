"""``python -m weights_convert.harness.cli``: the ``attention-unet`` command."""

import sys

from weights_convert.harness.cli import main

sys.exit(main())
