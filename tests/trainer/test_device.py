"""The compute dtype is chosen by the machine (`trainer/device.py`), never hard-coded."""
import pytest
import torch

from saeforge.trainer import device as D
from saeforge.trainer.config import SAEConfig, TrainConfig
from saeforge.trainer.loop import SweepTrainer


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with (native=True) or without native bf16, with a given bf16/fp32 speed-up."""
    def set_(native: bool, speedup: float = 8.0):
        monkeypatch.setattr(D, "cpu_has_native_bf16", lambda: native)
        monkeypatch.setattr(D, "cpu_bf16_speedup", lambda: speedup)
    return set_


def test_auto_is_float32_on_a_cpu_without_native_bf16(cpu):
    cpu(native=False)
    assert D.resolve_dtype("auto", "cpu") == "float32"


def test_auto_is_bf16_only_where_native_and_faster(cpu):
    cpu(native=True, speedup=8.0)
    assert D.resolve_dtype("auto", "cpu") == "bfloat16"
    cpu(native=True, speedup=1.05)  # native but not faster here: fp32
    assert D.resolve_dtype("auto", "cpu") == "float32"


def test_explicit_bf16_on_a_cpu_without_it_warns_once_with_the_slowdown(cpu, capsys):
    cpu(native=False)
    assert D.resolve_dtype("bfloat16", "cpu") == "bfloat16"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "slower than float32" in err[0] and "--dtype auto" in err[0]
    cpu(native=True)
    assert D.resolve_dtype("bfloat16", "cpu") == "bfloat16" and capsys.readouterr().err == ""


def test_unknown_dtype_is_named():
    with pytest.raises(ValueError, match="unknown dtype 'bf32'"):
        D.resolve_dtype("bf32", "cpu")


def test_speedup_is_measured_once_and_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("SAEFORGE_CACHE", str(tmp_path))
    D.cpu_bf16_speedup.cache_clear()
    calls = []
    monkeypatch.setattr(D, "_matmul_rate", lambda dtype, **kw: calls.append(dtype) or (4.0 if dtype == torch.bfloat16 else 1.0))
    assert D.cpu_bf16_speedup() == 4.0 and len(calls) == 2
    D.cpu_bf16_speedup.cache_clear()
    assert D.cpu_bf16_speedup() == 4.0 and len(calls) == 2  # read back from the cache file
    assert (tmp_path / "saeforge" / "dtype.json").is_file()
    D.cpu_bf16_speedup.cache_clear()


@pytest.mark.parametrize("native, expected", [(False, False), (True, True)])
def test_training_autocast_auto_follows_the_machine(cpu, native, expected):
    cpu(native=native)
    train = TrainConfig(hook="h", autocast="auto")
    assert SweepTrainer([SAEConfig(d_sae=8)], train, 4).autocast is expected
    assert SweepTrainer([SAEConfig(d_sae=8)], TrainConfig(hook="h", autocast="none"), 4).autocast is False
    # float64 weights never autocast
    assert SweepTrainer([SAEConfig(d_sae=8)], train, 4, dtype=torch.float64).autocast is False
