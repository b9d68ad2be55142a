"""The default precision (trainer.precision=${auto_precision:}, predict.py's precision=auto): bf16 autocast
where the hardware multiplies bf16 natively, float32 elsewhere; the environment pins the CPU's."""

import pytest
import torch

import detectors.config as config
from detectors.tasks.predict import autocast_dtype


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(config.CPU_PRECISION_ENV, raising=False)


@pytest.mark.parametrize("native, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_a_cpu_gets_bf16_only_with_native_bf16(cpu_only, monkeypatch, native, expected):
    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: native)
    assert config.auto_precision() == expected
    # predict.py's auto follows training's rule on the CPU
    assert autocast_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else None)


def test_the_environment_pins_the_cpu_precision(cpu_only, monkeypatch):
    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setenv(config.CPU_PRECISION_ENV, "32-true")
    assert config.auto_precision() == "32-true"
    assert autocast_dtype("auto", torch.device("cpu")) is None


def test_a_gpu_always_gets_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(config.CPU_PRECISION_ENV, "32-true")  # the CPU's pin does not reach the GPU
    assert config.auto_precision() == "bf16-mixed"


@pytest.mark.parametrize("flags, expected", [("fpu avx512f avx512_bf16 sse", True), ("fpu amx_bf16 amx_tile", True),
                                             ("fpu avx512f avx512bw", False), ("avx512_bf16x", False)])
def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, flags, expected):
    class Info:
        def __init__(self, path):
            pass

        def read_text(self):
            return f"processor\t: 0\nflags\t\t: {flags}\n"

    monkeypatch.setattr(config, "Path", Info)
    assert config.cpu_has_native_bf16() is expected


def test_no_cpuinfo_means_no_native_bf16(monkeypatch):
    class Missing:
        def __init__(self, path):
            pass

        def read_text(self):
            raise FileNotFoundError("/proc/cpuinfo")

    monkeypatch.setattr(config, "Path", Missing)
    assert config.cpu_has_native_bf16() is False
