"""Where and in what precision to compute: `resolve_device` and `resolve_dtype`, shared by every stage.

`--dtype auto` (the default of harvest, eval and training autocast) picks bfloat16 only where the device runs
it natively AND faster than float32, else float32:

- CUDA: bfloat16 when `torch.cuda.is_bf16_supported()`.
- CPU: bfloat16 when the CPU has AVX512-BF16 or AMX *and* a 2048x2048 bf16 matmul beats fp32 by >= 1.2x in a
  short micro-benchmark (cached per CPU model, torch version and thread count). On an AVX2-only CPU a bf16
  matmul runs about 10x slower than fp32, so auto never picks it there.

An explicit `bfloat16` on a CPU without native bf16 is honoured with one warning line that says how much
slower it measured. The compute dtype is not the store dtype: stores stay bf16 by default (a storage format).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from functools import lru_cache
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
MIN_SPEEDUP = 1.2
"""bf16 must be at least this much faster than fp32 in the micro-benchmark for `auto` to pick it."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` -> cuda when available, else cpu; anything else as given (`cpu`, `cuda`, `cuda:1`, `mps`) when
    this machine has it. ConfigError (one line naming `--device`) for a name torch does not know or a device
    this machine lacks, before anything is allocated or written."""
    from saeforge.trainer.errors import ConfigError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {device!r} (--device): expected auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"device {device!r} (--device) is not available: {why}; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} (--device) is not available: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} (--device) is not available on this machine; use --device cpu or auto")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {device!r} (--device) is not supported: expected auto, cpu, cuda, cuda:N or mps")
    return dev


def cpu_name() -> str:
    """The CPU's model name (for results that state the machine they were measured on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU instructions that make bf16 matmuls fast."""
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def _matmul_rate(dtype: torch.dtype, n: int = 1024, seconds: float = 0.25) -> float:
    """Matmuls of (n, n) @ (n, n) per second in `dtype` on the CPU (after one warm-up)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        a @ b
        reps += 1
    return reps / elapsed


def _cache_file() -> Path:
    root = os.environ.get("SAEFORGE_CACHE") or os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(root).expanduser() / "saeforge" / "dtype.json"


@lru_cache(maxsize=None)
def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of a CPU matmul, measured once per machine (CPU, torch, threads) and cached."""
    key = f"{cpu_name()}|torch {torch.__version__}|threads {torch.get_num_threads()}"
    path = _cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return float(cached[key])
    speedup = _matmul_rate(torch.bfloat16) / _matmul_rate(torch.float32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**cached, key: round(speedup, 3)}, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only costs the measurement next time
    return speedup


def auto_dtype(device: torch.device) -> str:
    """The compute dtype `auto` means on `device`: `bfloat16` where it is native and faster, else `float32`."""
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device.type == "cpu" and cpu_has_native_bf16() and cpu_bf16_speedup() >= MIN_SPEEDUP:
        return "bfloat16"
    return "float32"


def resolve_dtype(spec: str, device: str | torch.device = "auto", *, warn: bool = True) -> str:
    """`auto` -> the device's best compute dtype; an explicit name is returned unchanged (with one warning line
    on stderr when it is bf16 on a CPU without native bf16). Returns a name from `DTYPES`."""
    if spec not in DTYPE_CHOICES:
        from saeforge.trainer.errors import ConfigError

        raise ConfigError(f"unknown dtype {spec!r}: expected one of {', '.join(DTYPE_CHOICES)}")
    device = resolve_device(device) if isinstance(device, str) else device
    if spec == "auto":
        return auto_dtype(device)
    if warn and spec in ("bfloat16", "float16") and device.type == "cpu" and not cpu_has_native_bf16():
        slower = 1 / max(_matmul_rate(DTYPES[spec], seconds=0.1) / _matmul_rate(torch.float32, seconds=0.1), 1e-9)
        print(f"warning: {spec} on this CPU ({cpu_name()}, no AVX512-BF16/AMX) measured {slower:.1f}x slower "
              "than float32 for a matmul; --dtype auto would use float32", file=sys.stderr)
    return spec
