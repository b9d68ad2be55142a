"""python -m detectors.weights darknet CFG WEIGHTS [--names FILE] [--input-size H [W]] --out OUT.ckpt
python -m detectors.weights torchvision ssd300_vgg16 [--weights COCO_V1|FILE] --out OUT.ckpt"""

from __future__ import annotations

import sys

USAGE = __doc__.strip()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("darknet", "torchvision"):
        print(USAGE, file=sys.stderr)
        return 2
    if argv[0] == "darknet":
        from detectors.weights.darknet import main as run
    else:
        from detectors.weights.torchvision_ssd import main as run
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
