"""python -m detectors.export ckpt_path=PATH [nms=true] ...: see detectors.tasks.export."""

import sys

from detectors.tasks.export import main

sys.exit(main())
