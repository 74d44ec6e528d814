"""How fast StoreLoader streams a store from S3 against the same store on local disk.

    python scripts/bench_remote.py                    # 200k rows x d=576 bf16, written once to /tmp (a minute)
    python scripts/bench_remote.py --rows 65536 --passes 2

The store is written once to local disk, then uploaded as it is to an S3 API on 127.0.0.1: moto's server
(``moto[server]``), run as its own process so it does not share this process's GIL. The loader then reads
``--epochs`` back to back from each, alternating, ``--passes`` times (the machine may be shared: best pass of
each): local disk and
S3 with the loader's defaults (at a URL: whole shards, one request each, a thread per read in flight:
``stores/loader.py``), and S3 read in the units a local store gets (4096 rows at d=576 bf16) for comparison.
What the server delivers alone (the shard files fetched whole, no decoding) bounds the S3 rate, and the CPU seconds
per row of reader and server together bound it on a machine whose cores are all busy. Prints rows/s
and the ratio S3 / local (target >= 0.5: the best pass of each, and the median of the passes' ratios, each pass
reading both back to back) and writes them, with the CPU model, to ``scripts/results/bench_remote.json``.

moto serves from memory over HTTP on the loopback: no network latency or bandwidth limit, but its request
handling (Python) runs on the same cores as the loader, and every request, even a ranged one of a few bytes,
copies the whole object (~30 ms for a 52 MB shard file here): small reads cost it more than they would cost S3.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HOOK = "blocks.10.hook_resid_post"
RESULTS = Path(__file__).resolve().parent / "results" / "bench_remote.json"


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or "unknown"


def synthetic_block(n: int, d: int, seed: int) -> np.ndarray:
    """Residual-stream-like rows: heavy tails (Student t, df 4), a few large dims, a shared offset (as
    scripts/bench_loader.py writes them, so the compressed sizes match)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(df=4, size=(n, d)).astype(np.float32) * 0.5
    k = max(1, d // 200)
    x[:, :k] += rng.normal(20.0, 4.0, size=(n, k)).astype(np.float32)
    return x + np.random.default_rng(12345).normal(0, 0.2, size=(1, d)).astype(np.float32)


def build(path: str, rows: int, d: int) -> None:
    from saeforge.stores import StoreError, StoreWriter, open_store

    try:
        if open_store(path).n_rows == rows:
            return
    except StoreError:
        pass
    step = 65536
    with StoreWriter(path, {HOOK: d}, dtype="bfloat16", seed=0, expected_rows=rows, progress=True,
                     provenance={"source": "synthetic (scripts/bench_remote.py)"}) as w:
        for i, lo in enumerate(range(0, rows, step)):
            n = min(step, rows - lo)
            w.append({HOOK: synthetic_block(n, d, seed=i)}, token_ids=np.arange(lo, lo + n) % 49152,
                     seq_idx=np.arange(lo, lo + n) // 256, pos=np.arange(lo, lo + n) % 256)


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return server, endpoint
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError("moto's server did not start")


def upload(local: str, endpoint: str) -> tuple[str, dict]:
    import boto3
    import s3fs

    opts = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                 region_name="us-east-1").create_bucket(Bucket="bench")
    s3fs.S3FileSystem(**opts).put(local, "bench/store", recursive=True)
    return "s3://bench/store", opts


class CpuClock:
    """CPU seconds (user + system) of this process and of the server process, from a start."""

    def __init__(self, server_pid: int | None):
        self.pid = server_pid
        self.t0 = self._now()

    def _now(self) -> tuple[float, float]:
        server = 0.0
        if self.pid is not None:
            fields = open(f"/proc/{self.pid}/stat").read().rsplit(")", 1)[1].split()
            server = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        return time.process_time(), server

    def spent(self) -> dict:
        (c0, s0), (c1, s1) = self.t0, self._now()
        return {"cpu_s_reader": c1 - c0, "cpu_s_server": s1 - s0}


def loader_rate(url: str, threads: int, epochs: int, storage_options: dict | None = None,
                read_chunks: int | None = None, server_pid: int | None = None) -> dict:
    from saeforge.stores import StoreLoader

    loader = StoreLoader(url, hooks=[HOOK], batch_rows=4096, threads=threads, epochs=epochs,
                         storage_options=storage_options, read_chunks=read_chunks)
    clock, t0, n = CpuClock(server_pid), time.perf_counter(), 0
    for batch in loader:
        n += batch[HOOK].shape[0]
    dt = time.perf_counter() - t0
    c = loader.counters
    return {"rows_per_s": n / dt, "rows": n, "seconds": dt, "wait_fraction": c.wait_s / dt,
            "read_ahead_units": loader.read_ahead, "unit_rows": loader.unit_rows, **clock.spent()}


def fetch_rate(url: str, storage_options: dict, epochs: int, server_pid: int) -> dict:
    """What the server delivers with no decoding: the hook's shard files, whole, two requests at a time, as many
    times as the loader reads them (rows/s as the loader would count them)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **storage_options)
    files = [p for p in fs.find(f"{root}/{HOOK}") if "/c/" in p] * epochs
    from concurrent.futures import ThreadPoolExecutor

    clock, t0 = CpuClock(server_pid), time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        nbytes = sum(len(b) for b in pool.map(fs.cat_file, files))
    dt = time.perf_counter() - t0
    spent = clock.spent()
    rows = epochs * int(json.loads(fs.cat_file(f"{root}/zarr.json"))["attributes"]["n_rows"])
    return {"rows_per_s": rows / dt, "rows": rows, "seconds": dt, "bytes_per_s": nbytes / dt, **spent}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/saeforge_bench_remote", help="Local store (written once, then reused).")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--threads", type=int, default=2, help="Loader decode threads.")
    ap.add_argument("--epochs", type=int, default=3,
                    help="Epochs per pass, streamed back to back as the trainer reads them (the first read's wait "
                         "counts once per pass).")
    ap.add_argument("--passes", type=int, default=3, help="Passes over each (the best one counts).")
    ap.add_argument("--out", default=str(RESULTS), help="JSON results ('' for none).")
    args = ap.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    from saeforge.stores import open_store
    from saeforge.stores.loader import StoreLoader

    build(args.dir, args.rows, args.d)
    local = StoreLoader(args.dir, hooks=[HOOK], threads=args.threads)
    local_chunks = local.unit_rows // local.store.chunk_rows
    server, endpoint = start_moto()
    try:
        url, opts = upload(args.dir, endpoint)
        runs: dict[str, list] = {"local": [], "s3": [], "s3_local_units": [], "s3_fetch_only": []}
        for _ in range(args.passes):
            runs["s3_fetch_only"].append(fetch_rate(url, opts, args.epochs, server.pid))
            runs["local"].append(loader_rate(args.dir, args.threads, args.epochs))
            runs["s3"].append(loader_rate(url, args.threads, args.epochs, opts, server_pid=server.pid))
            runs["s3_local_units"].append(loader_rate(url, args.threads, args.epochs, opts, read_chunks=local_chunks,
                                                      server_pid=server.pid))
    finally:
        server.terminate()
        server.wait()
    best = {k: max(v, key=lambda r: r["rows_per_s"]) for k, v in runs.items()}
    paired = sorted(s["rows_per_s"] / lo["rows_per_s"] for s, lo in zip(runs["s3"], runs["local"]))
    cpu = {k: sorted((r["cpu_s_reader"] + r["cpu_s_server"]) / r["rows"] * 1e6 for r in v)[len(v) // 2]
           for k, v in runs.items()}  # median CPU seconds per million rows, reader + server
    store = open_store(args.dir)
    result = {
        "cpu": cpu_model(), "rows": args.rows, "d": args.d, "dtype": "bfloat16", "threads": args.threads,
        "bytes_stored": store.nbytes_stored(), "epochs_per_pass": args.epochs, "passes": args.passes,
        "best": best, "ratio_s3_over_local": best["s3"]["rows_per_s"] / best["local"]["rows_per_s"],
        "ratio_s3_local_units_over_local": best["s3_local_units"]["rows_per_s"] / best["local"]["rows_per_s"],
        "ratio_s3_fetch_only_over_local": best["s3_fetch_only"]["rows_per_s"] / best["local"]["rows_per_s"],
        "median_paired_ratio_s3_over_local": paired[len(paired) // 2],
        "cpu_s_per_million_rows": cpu, "cpu_ratio_local_over_s3": cpu["local"] / cpu["s3"],
        "target_ratio": 0.5, "all_passes": runs,
    }
    print(f"CPU: {result['cpu']}")
    print(f"store: {args.rows:,} rows x d={args.d} bf16, {result['bytes_stored'] / 2**20:.1f} MiB stored")
    for k, r in best.items():
        how = (f"read-ahead {r['read_ahead_units']} units of {r['unit_rows']} rows, consumer waited "
               f"{r['wait_fraction']:.0%}" if "unit_rows" in r else
               f"{r['bytes_per_s'] / 2**20:,.0f} MiB/s, no decoding")
        print(f"{k:<16} {r['rows_per_s']:>12,.0f} rows/s   ({how})")
    print(f"ratio s3 / local: {result['ratio_s3_over_local']:.2f}x best of each, "
          f"{result['median_paired_ratio_s3_over_local']:.2f}x median of passes (target >= 0.5); s3 in local-sized "
          f"units: {result['ratio_s3_local_units_over_local']:.2f}x; the server alone: "
          f"{result['ratio_s3_fetch_only_over_local']:.2f}x")
    print("CPU s per million rows (reader + server, median): " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
          + f"; on cores that are all busy, S3 can reach {result['cpu_ratio_local_over_s3']:.2f}x of local at most")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
