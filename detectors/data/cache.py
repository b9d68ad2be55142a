"""Decoded images kept in RAM (``data.cache=ram``): decoded once, read by every worker in every epoch.

For small datasets (BCCD: 205 training images of 640x480, 190 MB decoded) JPEG decoding is the
largest single cost of a sample; with the cache a sample costs its augmentation only.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from detectors.data.records import BadSampleError, Record, Source

log = logging.getLogger(__name__)


def available_memory() -> int | None:
    """Bytes of memory the system can still give out (Linux ``MemAvailable``), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class RAMCache:
    """A source that serves the decoded images of ``records`` from one array in memory.

    Built once, in the main process, before the loaders start: threads decode in parallel (OpenCV
    releases the GIL). All pixels live in one contiguous uint8 array that nothing writes to after
    the build, so forked loader workers (Linux's default) read the parent's pages without copying
    them, and persistent workers keep reading them epoch after epoch. (With the 'spawn' start method
    each worker would receive its own copy.)

    Unreadable images are remembered and raise the same ``BadSampleError`` on every ``load``, so the
    dataset skips and counts them as it does without the cache. Records not in the cache are loaded
    from ``source``.

    Args:
        source: the dataset format object whose ``load`` decodes an image.
        records: the records to cache (one split).
        num_threads: decoding threads (default: the CPU count, at most 16).
        max_memory_fraction: refuse to build when the decoded images (held twice while the array
            is filled) would take more than this fraction of the available memory.
    """

    def __init__(self, source: Source, records: list[Record], num_threads: int | None = None,
                 max_memory_fraction: float = 0.5):
        self.source = source
        estimate = sum(int(r.width) * int(r.height) * 3 for r in records)
        free = available_memory()
        if free is not None and 2 * estimate > max_memory_fraction * free:
            raise MemoryError(
                f"data.cache=ram needs about {2 * estimate / 2**30:.1f} GiB while it is built (the decoded "
                f"images twice) but only {free / 2**30:.1f} GiB are available; use data.cache=none"
            )
        start = time.perf_counter()
        threads = num_threads or min(os.cpu_count() or 1, 16)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            decoded = list(pool.map(self._decode, records))

        self._records = [full for _, full, _ in decoded]
        self.errors = [error for _, _, error in decoded]
        shapes = [image.shape if image is not None else (0, 0, 3) for image, _, _ in decoded]
        self.shapes = np.array(shapes, dtype=np.int64).reshape(-1, 3)
        sizes = self.shapes.prod(1)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.pixels = np.empty(int(self.offsets[-1]), dtype=np.uint8)
        for i, (image, _, _) in enumerate(decoded):
            if image is not None:
                self.pixels[self.offsets[i]:self.offsets[i + 1]] = image.reshape(-1)
            decoded[i] = (None, None, None)  # free each decoded image once copied
        self.index = {r.file: i for i, r in enumerate(records)}
        log.info("data.cache=ram: %d images, %.0f MB decoded in %.1f s (%d threads)", len(records),
                 self.pixels.nbytes / 1e6, time.perf_counter() - start, threads)

    def _decode(self, record: Record) -> tuple[np.ndarray | None, Record, str | None]:
        try:
            image, full = self.source.load(record)
            return np.ascontiguousarray(image, dtype=np.uint8), full, None
        except BadSampleError as e:
            return None, record, str(e)

    @property
    def classes(self) -> list[str]:
        return list(self.source.classes)

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes)

    def __len__(self) -> int:
        return len(self._records)

    def records(self, split: str) -> list[Record]:
        return self.source.records(split)

    def load(self, record: Record) -> tuple[np.ndarray, Record]:
        """The cached image (H, W, 3) uint8, a copy (transforms may write to it), and its record."""
        i = self.index.get(record.file)
        if i is None:
            return self.source.load(record)
        if self.errors[i] is not None:
            raise BadSampleError(self.errors[i])
        image = self.pixels[self.offsets[i]:self.offsets[i + 1]].reshape(*self.shapes[i])
        return image.copy(), self._records[i]
