"""How fast StoreLoader streams a store, against the raw codec and a numpy memmap of the same rows.

    python scripts/bench_loader.py                      # builds /tmp/saeforge_bench_store once (minutes)
    python scripts/bench_loader.py --dir /data/bench --rows 2097152 --json

Prints, measured in one run: loader rows/s cold (shard files evicted from the page cache with
posix_fadvise) and warm, with 1 and 2 threads; the raw decode rate (crc32c + blosc/zstd straight from
the shard files' bytes, no zarr, same threads); a memmap of the uncompressed rows; bytes on disk per row
against raw fp32; and the ratios against the targets (loader >= 0.7x raw decode, >= 500k rows/s bf16).
Warm loader and raw decode figures are the best of 2 and 3 passes: the machine may be shared.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

HOOK = "blocks.15.hook_resid_post"


def synthetic_block(n: int, d: int, seed: int) -> np.ndarray:
    """Heavy-tailed rows (Student t, df 4), a few large-norm dims and a shared offset: residual-stream-like."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(df=4, size=(n, d)).astype(np.float32) * 0.5
    k = max(1, d // 200)
    x[:, :k] += rng.normal(20.0, 4.0, size=(n, k)).astype(np.float32)
    return x + np.random.default_rng(12345).normal(0, 0.2, size=(1, d)).astype(np.float32)


def build(path: str, rows: int, d: int, dtype: str) -> float:
    from saeforge.stores import StoreWriter

    t0 = time.perf_counter()
    step = 65536
    with StoreWriter(path, {HOOK: d}, dtype=dtype, seed=0, expected_rows=rows, progress=True,
                     provenance={"source": "synthetic (scripts/bench_loader.py)"}) as w:
        for i, lo in enumerate(range(0, rows, step)):
            n = min(step, rows - lo)
            w.append({HOOK: synthetic_block(n, d, seed=i)}, token_ids=np.arange(lo, lo + n) % 49152,
                     seq_idx=np.arange(lo, lo + n) // 256, pos=np.arange(lo, lo + n) % 256)
            print(f"\rstaged {lo + n}/{rows}", end="", file=sys.stderr)
    print(file=sys.stderr)
    return time.perf_counter() - t0


def evict(path: str) -> bool:
    """Drop the store's files from the page cache (no root needed); False where unsupported."""
    ok = hasattr(os, "posix_fadvise")
    for f in glob.glob(f"{path}/**/*", recursive=True):
        if ok and os.path.isfile(f):
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    return ok


def loader_rate(path, threads, out_dtype, max_rows, batch_rows=4096):
    import torch

    from saeforge.stores import StoreLoader

    loader = StoreLoader(path, hooks=[HOOK], batch_rows=batch_rows, threads=threads, epochs=1,
                         out_dtype=getattr(torch, out_dtype))
    t0, n = time.perf_counter(), 0
    for batch in loader:
        n += batch[HOOK].shape[0]
        if n >= max_rows:
            break
    dt = time.perf_counter() - t0
    c = loader.counters
    return {"rows_per_s": n / dt, "rows": n, "wait_frac": c.wait_s / dt, "decode_s": c.decode_s}


def shard_chunks(path: str, n_shards: int):
    """Every inner chunk's stored bytes, read straight from the shard files via the shard index."""
    from saeforge.stores import open_store

    s = open_store(path)
    per = s.shard_rows // s.chunk_rows
    out = []
    for k in range(n_shards):
        f = f"{path}/{HOOK}/c/{k}/0"
        if not os.path.exists(f):
            break
        blob = open(f, "rb").read()
        index = np.frombuffer(blob[-(per * 16 + 4) : -4], dtype="<u8").reshape(per, 2)
        out += [blob[o : o + n] for o, n in index if o != 2**64 - 1]
    return out, s.chunk_rows


def raw_decode_rate(chunks, chunk_rows, threads, reuse_buffer):
    import crc32c
    from numcodecs import Blosc

    codec = Blosc()
    local = threading.local()

    def decode(b):
        body = memoryview(b)[:-4]
        if crc32c.crc32c(body) != int.from_bytes(b[-4:], "little"):
            raise ValueError("checksum")
        if not reuse_buffer:  # a fresh output array per chunk, as a loader handing out new tensors needs
            return codec.decode(body, out=np.empty(codec_size(body), np.uint8))
        if not hasattr(local, "out"):  # one reused output buffer per thread: the codec's upper bound
            local.out = np.empty(codec_size(body), np.uint8)
        return codec.decode(body, out=local.out[: codec_size(body)])

    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(decode, chunks[:8]))
        for _ in range(3):  # best of 3: the machine is shared
            t0 = time.perf_counter()
            list(pool.map(decode, chunks))
            best = max(best, len(chunks) * chunk_rows / (time.perf_counter() - t0))
    return best


def codec_size(body) -> int:
    """Decoded size from the blosc header (bytes 4..8)."""
    return int.from_bytes(bytes(body[4:8]), "little")


def memmap_rate(path, rows, d, itemsize, batch_rows=4096):
    raw = f"{path}.raw"
    if not os.path.exists(raw) or os.path.getsize(raw) != rows * d * itemsize:
        from saeforge.stores import open_store

        s, mm = open_store(path), np.memmap(raw, dtype=f"u{itemsize}", mode="w+", shape=(rows, d))
        for lo in range(0, rows, s.shard_rows):
            mm[lo : lo + s.shard_rows] = s.array(HOOK)[lo : lo + s.shard_rows].view(f"u{itemsize}")
        mm.flush()
        del mm
    mm = np.memmap(raw, dtype=f"u{itemsize}", mode="r", shape=(rows, d))
    rates = {}
    for label in ("cold", "warm"):
        if label == "cold":
            fd = os.open(raw, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        t0 = time.perf_counter()
        for lo in range(0, rows, batch_rows):
            np.array(mm[lo : lo + batch_rows])
        rates[label] = rows / (time.perf_counter() - t0)
    return rates


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/saeforge_bench_store")
    ap.add_argument("--rows", type=int, default=1 << 20)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--build-only", action="store_true", help="build (or reuse) the store, measure nothing")
    args = ap.parse_args()
    from saeforge.stores import StoreError, open_store

    res = {"rows": args.rows, "d": args.d, "dtype": args.dtype, "cpus": os.cpu_count()}
    try:
        s = open_store(args.dir)
        ok = s.n_rows == args.rows and s.d(HOOK) == args.d and s.dtype == args.dtype
    except StoreError:
        ok = False
    if not ok:
        import shutil

        shutil.rmtree(args.dir, ignore_errors=True)
        res["build_s"] = build(args.dir, args.rows, args.d, args.dtype)
        s = open_store(args.dir)
    if args.build_only:
        print(f"store ready: {s}" + (f" (built in {res['build_s']:.0f} s)" if "build_s" in res else ""))
        return
    itemsize = {"bfloat16": 2, "float16": 2, "float32": 4}[args.dtype]
    res["bytes_per_row_disk"] = s.nbytes_stored() / s.n_rows
    res["bytes_per_row_hook_disk"] = s.array(HOOK).nbytes_stored() / s.n_rows
    res["x_smaller_than_raw_fp32"] = 4 * args.d / res["bytes_per_row_hook_disk"]
    res["chunk_rows"], res["shard_rows"] = s.chunk_rows, s.shard_rows
    chunks, chunk_rows = shard_chunks(args.dir, n_shards=1 << 30)  # every chunk: the loader reads them all too
    for threads in (1, 2):
        res[f"raw_decode_t{threads}"] = raw_decode_rate(chunks, chunk_rows, threads, reuse_buffer=False)
        res[f"raw_decode_reuse_t{threads}"] = raw_decode_rate(chunks, chunk_rows, threads, reuse_buffer=True)
        evict(args.dir)
        res[f"loader_cold_t{threads}"] = loader_rate(args.dir, threads, args.dtype, args.rows)
        res[f"loader_warm_t{threads}"] = max((loader_rate(args.dir, threads, args.dtype, args.rows) for _ in range(2)),
                                             key=lambda r: r["rows_per_s"])
        res[f"loader_warm_fp32_t{threads}"] = loader_rate(args.dir, threads, "float32", args.rows)
    res["memmap"] = memmap_rate(args.dir, args.rows, args.d, itemsize)
    best = max(res["loader_warm_t1"]["rows_per_s"], res["loader_warm_t2"]["rows_per_s"])
    res["ratio_loader_vs_raw_decode_t2"] = res["loader_warm_t2"]["rows_per_s"] / res["raw_decode_t2"]
    res["ratio_loader_vs_raw_decode_t1"] = res["loader_warm_t1"]["rows_per_s"] / res["raw_decode_t1"]
    for t in (1, 2):
        res[f"ratio_loader_vs_raw_decode_reuse_t{t}"] = res[f"loader_warm_t{t}"]["rows_per_s"] / res[f"raw_decode_reuse_t{t}"]
    res["target_500k"] = best / 500_000
    if args.json:
        print(json.dumps(res, indent=1))
        return
    print(f"store {args.dir}: {s.n_rows} rows x {args.d} {args.dtype}, chunks {s.chunk_rows} rows, "
          f"shards {s.shard_rows} rows, {os.cpu_count()} CPUs")
    print(f"disk: {res['bytes_per_row_hook_disk']:.0f} B/row for the hook ({res['x_smaller_than_raw_fp32']:.2f}x "
          f"smaller than raw fp32 {4 * args.d} B/row); all arrays {res['bytes_per_row_disk']:.0f} B/row")
    print("| measurement | 1 thread rows/s | 2 threads rows/s |")
    print("| --- | ---: | ---: |")
    for key, label in [("raw_decode", "raw codec decode (crc32c + blosc, no zarr), fresh output arrays"),
                       ("raw_decode_reuse", "raw codec decode, one reused output buffer (upper bound)"),
                       ("loader_cold", f"loader cold, {args.dtype} out"), ("loader_warm", f"loader warm, {args.dtype} out"),
                       ("loader_warm_fp32", "loader warm, float32 out")]:
        a, b = res[f"{key}_t1"], res[f"{key}_t2"]
        a, b = (a, b) if key.startswith("raw_decode") else (a["rows_per_s"], b["rows_per_s"])
        print(f"| {label} | {a:,.0f} | {b:,.0f} |")
    print(f"| numpy memmap, uncompressed (cold / warm) | {res['memmap']['cold']:,.0f} | {res['memmap']['warm']:,.0f} |")
    print(f"loader warm / raw decode (fresh arrays): {res['ratio_loader_vs_raw_decode_t1']:.2f}x (1 thread), "
          f"{res['ratio_loader_vs_raw_decode_t2']:.2f}x (2 threads)   target >= 0.70x")
    print(f"loader warm / raw decode (reused buffer): {res['ratio_loader_vs_raw_decode_reuse_t1']:.2f}x (1 thread), "
          f"{res['ratio_loader_vs_raw_decode_reuse_t2']:.2f}x (2 threads)")
    print(f"best loader rate / 500k rows/s target: {res['target_500k']:.2f}x")
    if "build_s" in res:
        print(f"(built the store in {res['build_s']:.0f} s)")


if __name__ == "__main__":
    main()
