"""``python -m detectors.anchors kmeans data=... [k=5] ...``: the entry point of ``detectors.tasks.anchors``.

A ``__main__`` of its own so the primitives in ``detectors.anchors`` never import the task that uses them.
"""

import sys

from detectors.tasks.anchors import main

sys.exit(main())
