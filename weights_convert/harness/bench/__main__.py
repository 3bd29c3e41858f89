"""A bench worker: ``python -m weights_convert.harness.bench worker FRAMEWORK BACKEND SETTINGS_JSON``
prints the rows of one framework (Keras: one backend) as JSON on stdout (see ``workers``)."""

import sys

from weights_convert.harness.bench.workers import serve

if __name__ == "__main__":
    sys.exit(serve(sys.argv[1:]))
