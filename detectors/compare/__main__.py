"""``python -m detectors.compare ...``: the entry point of ``detectors.tasks.compare``."""

import sys

from detectors.tasks.compare import main

sys.exit(main())
