"""The RAM cache of decoded images (data.cache=ram) and the data-throughput benchmark (tiny, CPU)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from detectors.data.cache import RAMCache
from detectors.data.datamodule import DetectionDataModule
from detectors.data.dataset import DetectionDataset, collate_detection
from detectors.data.formats.voc import VOCSource
from detectors.data.records import BadSampleError, Record
from detectors.data.transforms import build_transform

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


class FirstRecords:
    """The first ``limit`` records of each split (keeps the tests small)."""

    def __init__(self, source, limit):
        self.source, self.limit, self.classes = source, limit, source.classes
        self.loads = 0

    def records(self, split):
        return self.source.records(split)[: self.limit]

    def load(self, record):
        self.loads += 1
        return self.source.load(record)


def test_cache_serves_what_the_source_decodes(bccd_root):
    source = VOCSource(bccd_root)
    records = source.records("val")[:12]
    cache = RAMCache(source, records, num_threads=2)
    assert cache.nbytes == sum(r.width * r.height * 3 for r in records)
    for record in records:
        cached, cached_record = cache.load(record)
        image, _ = source.load(record)
        assert cached.dtype == np.uint8 and np.array_equal(cached, image)
        np.testing.assert_array_equal(cached_record.boxes, record.boxes)
    # what load hands out is a copy: a transform writing into it cannot change the cache
    first, _ = cache.load(records[0])
    first[...] = 0
    assert np.array_equal(cache.load(records[0])[0], source.load(records[0])[0])


def test_cached_and_uncached_training_batches_are_identical(bccd_root):
    batches = {}
    for cache in ("none", "ram"):
        source = FirstRecords(VOCSource(bccd_root), 8)
        dm = DetectionDataModule(source, input_size=(300, 300), augment={"preset": "ssd"}, batch_size=4,
                                 num_workers=0, cache=cache, seed=3)
        batches[cache] = list(dm.train_dataloader()) + list(dm.train_dataloader())  # two passes
        if cache == "ram":
            assert source.loads == 8  # decoded once, at build time, not again in the second pass
    for a, b in zip(batches["none"], batches["ram"]):
        for key in ("images", "boxes", "labels", "mask", "image_ids", "orig_sizes"):
            assert torch.equal(a[key], b[key]), key


class _Unreadable:
    classes = ["a"]

    def load(self, record):
        if record.file == "bad":
            raise BadSampleError("unreadable or missing image bad")
        return np.full((20, 30, 3), 7, np.uint8), record


def test_unreadable_images_are_skipped_and_counted_as_without_the_cache():
    records = [Record(0, "good", 30, 20, [[1, 1, 10, 10]], [0]), Record(1, "bad", 30, 20, [], [])]
    cache = RAMCache(_Unreadable(), records, num_threads=1)
    with pytest.raises(BadSampleError, match="unreadable or missing image bad"):
        cache.load(records[1])
    ds = DetectionDataset(cache, records, build_transform("none", (16, 16)))
    batch = collate_detection([ds[0], ds[1]])
    assert len(batch["images"]) == 1 and int(batch["num_skipped"]) == 1
    assert ds.skips.counts == {"unreadable image": 1}  # counted by kind (the warning line names the file)


def test_a_cache_that_would_not_fit_is_refused_with_the_reason():
    records = [Record(0, "good", 30, 20, [], [])]
    with pytest.raises(MemoryError, match="data.cache=ram needs .* use data.cache=none"):
        RAMCache(_Unreadable(), records, max_memory_fraction=1e-15)
    with pytest.raises(ValueError, match="data.cache must be 'none' or 'ram', got 'disk'"):
        DetectionDataModule(_Unreadable(), cache="disk")


class _PrivateMemory(Dataset):
    """Loads a sample, then reports the bytes of memory the worker has written to (Private_Dirty)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.dataset[(index, 0)]
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no Private_Dirty line")


def _worker_memory(dataset):
    """The most memory a forked worker of a 2-worker loader has written to while reading every sample."""
    loader = DataLoader(_PrivateMemory(dataset), batch_size=None, num_workers=2, multiprocessing_context="fork")
    return max(list(loader))


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc")
def test_workers_read_the_cache_without_copying_it(bccd_root):
    """Two forked workers read every cached image; they write no more memory than workers that
    decode from disk (a copy of the cache per worker, as pickling it to the workers would make,
    adds its size)."""
    written = {}
    for cache in ("none", "ram"):
        source = FirstRecords(VOCSource(bccd_root), 120)  # 110 MB decoded
        dm = DetectionDataModule(source, input_size=(300, 300), augment={"preset": "ssd"}, num_workers=0,
                                 cache=cache)
        dataset = dm.dataset("train")
        written[cache] = _worker_memory(dataset)
    cache_bytes = dataset.source.nbytes
    assert cache_bytes > 100e6
    assert written["ram"] - written["none"] < 0.15 * cache_bytes, (written, cache_bytes)


@pytest.mark.slow
def test_data_throughput_benchmark_runs(bccd_root, tmp_path, monkeypatch):
    """Timed with a clock that advances 0.5 s per reading, every rate is the number of images the timed
    batches held over 0.5 s: 6 images asked for are 2 batches of 4, 8 images (not 6, nor 2 batches, nor
    the warm-up's batches too), 16 img/s in every row. The batches are the training loader's: augmented,
    at the benchmark's size."""
    import types

    import data_throughput

    wall, cpu = iter(0.5 * i for i in range(10**6)), iter(0.5 * i for i in range(10**6))
    monkeypatch.setattr(data_throughput, "time", types.SimpleNamespace(perf_counter=lambda: next(wall),
                                                                       process_time=lambda: next(cpu)))
    shapes, real_loader = [], DetectionDataModule.train_dataloader

    class Recorded:
        """The training loader, noting the shape of every batch it delivers."""

        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            for batch in self.loader:
                shapes.append(tuple(batch["images"].shape))
                yield batch

    monkeypatch.setattr(data_throughput.DetectionDataModule, "train_dataloader",
                        lambda self: Recorded(real_loader(self)))
    out = data_throughput.main(["--root", str(bccd_root), "--limit", "8", "--batch", "4", "--workers", "0", "1",
                                "--cache", "none", "ram", "--images", "6", "--repeats", "1", "--size", "128",
                                "--json", str(tmp_path / "data.json")])
    assert set(out) == ({f"cache={c} workers={w}" for c in ("none", "ram") for w in (0, 1)}
                        | {f"cache={c} workers=0 cpu" for c in ("none", "ram")})
    # each clock is read at the start and the end of a timing, nowhere else: 0.5 s apart
    assert out == {k: pytest.approx(8 / 0.5) for k in out}
    assert shapes and set(shapes) == {(4, 3, 128, 128)}
    assert json.loads((tmp_path / "data.json").read_text()) == pytest.approx(out)
