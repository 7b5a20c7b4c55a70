"""``python -m deep_ep`` runs the benchmark, the package's main job (see ``deep_ep.bench``)."""

import sys

from deep_ep.bench import main

if __name__ == "__main__":
    sys.exit(main())
