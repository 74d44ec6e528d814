"""Training throughput against the GEMM bound, Gated/baseline cost, K-SAE sweep cost, and data wait.

    python scripts/bench_train.py                                   # CPU, d_in 576, d_sae 4608, batch 4096
    python scripts/bench_train.py --device cuda --d-sae 9216 --dtypes bf16     # compile auto: on for CUDA
    python scripts/bench_train.py --dtypes fp32 --out scripts/results/bench_train_cpu.json

Every figure is a ratio measured in this run (the machine may be shared):
  * rows/s of a training step (baseline, Gated; fp32 and bf16 autocast) / GEMM-bound rows/s, where the bound is
    the step's matmul FLOPs (baseline 10*B*n*M: encoder fwd + weight grad, decoder fwd + 2 grads; Gated 14*B*n*M:
    + the aux decoder's fwd and input grad) divided by the GFLOP/s measured on the step's own GEMM shape right
    before and after the step (the mean of the two);
  * Gated / baseline step time (paper: <= 1.5);
  * K-SAE sweep step time per SAE / one SAE's step time (target <= 1.0);
  * data-wait fraction when fed from a real store on disk (target <= 2%).
Prints one JSON object (and writes it to --out), naming the CPU, its load average at the start (the machine may be
shared) and the GPU ("not lent" when this machine has none).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from saeforge.trainer.config import SAEConfig, TrainConfig
from saeforge.trainer.device import cpu_name
from saeforge.trainer.loop import SweepTrainer

FLOPS_PER_BNM = {"baseline": 10, "gated": 14}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, steps, warmup=2) -> float:
    """Median-free mean seconds per call after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def gemm_gflops(B, n, M, dtype, device, steps) -> float:
    a = torch.randn(B, n, device=device, dtype=dtype)
    w = torch.randn(n, M, device=device, dtype=dtype)
    dt = timed(lambda: a @ w, device, steps * 3, warmup=3)
    return 2 * B * n * M / dt / 1e9


def step_time(saes, args, device, autocast, steps) -> float:
    train = TrainConfig(steps=10 ** 9, batch_rows=args.batch, lr_warmup_steps=0, resample_every=0, autocast=autocast,
                        compile=args.compile, stack_mib=args.stack_mib)
    trainer = SweepTrainer(saes, train, args.d_in, device=device)
    x = torch.randn(args.batch, args.d_in, device=device)
    return timed(lambda: trainer.train_step(x), device, steps, warmup=3 if trainer.compiled else 2)


def throughput(args, device) -> dict:
    out = {}
    for prec in args.dtypes:
        autocast, dtype = ("bf16", torch.bfloat16) if prec == "bf16" else ("none", torch.float32)
        times, rates = {}, []
        for arch in ("baseline", "gated"):
            # the GEMM rate right before and after the steps: on a shared machine the load moves between measurements
            before = gemm_gflops(args.batch, args.d_in, args.d_sae, dtype, device, args.steps)
            dt = step_time([SAEConfig(arch=arch, d_sae=args.d_sae)], args, device, autocast, args.steps)
            gflops = (before + gemm_gflops(args.batch, args.d_in, args.d_sae, dtype, device, args.steps)) / 2
            rates.append(gflops)
            bound = FLOPS_PER_BNM[arch] * args.batch * args.d_in * args.d_sae / (gflops * 1e9)
            times[arch] = dt
            out[f"{arch}_{prec}"] = {"rows_per_s": round(args.batch / dt), "gemm_bound_rows_per_s":
                                     round(args.batch / bound), "fraction_of_gemm_bound": round(bound / dt, 3)}
        out[f"gemm_gflops_{prec}"] = [round(r, 1) for r in rates]
        out[f"gated_over_baseline_step_time_{prec}"] = round(times["gated"] / times["baseline"], 3)
        print(f"[{prec}] {json.dumps(out)}", file=sys.stderr)
    return out


def sweep_cost(args, device) -> dict:
    autocast = "bf16" if "bf16" in args.dtypes and device.type == "cuda" else "none"
    one = step_time([SAEConfig(arch="gated", d_sae=args.d_sae)], args, device, autocast, args.steps)
    k_saes = [SAEConfig(arch="gated", d_sae=args.d_sae, l1_coefficient=1e-3 * (i + 1), seed=i) for i in range(args.k)]
    many = step_time(k_saes, args, device, autocast, max(1, args.steps // 2))
    return {f"sweep_k{args.k}_time_per_sae_over_lone": round(many / args.k / one, 3), "sweep_autocast": autocast}


def data_wait(args, device) -> dict:
    """Train from a real store on disk; report the fraction of wall time spent waiting for batches."""
    import numpy as np

    from saeforge.stores import StoreWriter
    from saeforge.trainer.run import train_from_store

    hook = "blocks.0.hook_resid_post"
    n_rows = args.batch * args.store_batches
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = Path(tmp) / "bench.zarr"
        g = np.random.default_rng(0)
        with StoreWriter(str(path), hooks={hook: args.d_in}, dtype="bfloat16", seed=0, expected_rows=n_rows) as w:
            for lo in range(0, n_rows, 65536):
                n = min(65536, n_rows - lo)
                w.append({hook: g.standard_normal((n, args.d_in), dtype=np.float32)},
                         token_ids=np.zeros(n, dtype=np.int64), seq_idx=np.arange(lo, lo + n) // 128,
                         pos=np.arange(lo, lo + n) % 128)
        steps = args.store_steps
        train = TrainConfig(hook=hook, steps=steps, batch_rows=args.batch, log_every=steps, checkpoint_every=0,
                            resample_every=0, autocast="bf16" if "bf16" in args.dtypes else "none",
                            device=str(device), compile=args.compile, stack_mib=args.stack_mib)
        t0 = time.perf_counter()
        summary = train_from_store(path, [SAEConfig(arch="gated", d_sae=args.d_sae)], train, Path(tmp) / "run",
                                   progress=False)[0]
        wall = time.perf_counter() - t0
    return {"store_steps": steps, "store_rows_per_s": round(steps * args.batch / wall),
            "data_wait_fraction": round(summary["data_wait_fraction"], 4), "loader_wait_s": summary["loader_wait_s"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    p.add_argument("--k", type=int, default=8, help="SAEs in the sweep measurement")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--store-batches", type=int, default=64, help="store size in batches (0: skip)")
    p.add_argument("--store-steps", type=int, default=40)
    p.add_argument("--skip", nargs="*", default=[], choices=["throughput", "sweep", "store"])
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="TrainConfig.compile: torch.compile the loss (auto: on for CUDA, off on the CPU)")
    p.add_argument("--stack-mib", type=int, default=0, help="TrainConfig.stack_mib (0: auto)")
    p.add_argument("--tmp", default=None, help="directory for the temporary store")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not lent"
    print(f"GPU: {gpu}; CPU: {cpu_name()}", file=sys.stderr)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "gpu": gpu,
              "cpu": cpu_name(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
              "threads": torch.get_num_threads(), "compile": args.compile, "d_in": args.d_in, "d_sae": args.d_sae,
              "batch": args.batch}
    if "throughput" not in args.skip:
        result.update(throughput(args, device))
    if "sweep" not in args.skip and args.k > 1:
        result.update(sweep_cost(args, device))
    if "store" not in args.skip and args.store_batches:
        result.update(data_wait(args, device))
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
