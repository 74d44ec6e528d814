"""Benchmark harvest, one section at a time (``--section``); prints ratios measured in one run.

    python scripts/bench_harvest.py                         # SmolLM2-135M (offline), layer 10, ctx 128, batch 8
    python scripts/bench_harvest.py --device cuda --model-config llama-1b --dataset synthetic --batches 100
    python scripts/bench_harvest.py --section finalize      # the writer's second pass: 1 worker vs all cores

Section ``stream`` (the default) measures, on one loaded model and the same token batches:
  bare      ``bridge(tokens, stop_at_layer=L+1)``: the floor harvest can reach;
  full      the full forward (what stop_at_layer saves);
  harvest1  ``harvest()`` with one site (resid_post), streaming phase (LM + hand-off + staging);
  harvest3  the same with three sites (resid_post, mlp_out, attn_out) from the same single pass;
  and the same bare/harvest1 pair with bf16 LM compute.
Targets: harvest1 >= 0.9x bare tok/s; harvest3 costs <= 1.1x harvest1. On CUDA the GPU utilisation
during harvest is sampled with nvidia-smi (or torch.cuda.utilization).

``--model-config`` builds a random-weight LlamaForCausalLM from a preset or a JSON file of LlamaConfig
fields (no hub needed: throughput does not depend on the weights); a byte-level BPE tokenizer is trained
on the benchmark text. ``--dataset synthetic`` writes a random-word corpus, for machines without PyPI.

Section ``finalize`` stages ``--rows`` synthetic bf16 rows of width ``--d`` once, then finalizes fresh copies
of that staged store (``StoreWriter.close``: shuffle, compress, write) with 1 worker and with every core, in
threads and in processes, each in a process of its own (its peak RSS is reported), interleaved over
``--finalize-repeats``; it checks that every variant wrote the same bytes and writes its measurements to
``--results`` (one JSON line per measurement on stdout too). Target: all cores >= 1.7x one worker on 2 cores.

Section ``distributed`` harvests the same ``--dist-tokens`` rows with a random-weight ``--model-config`` Llama
(saved to disk, so dask workers load it by path) in one process and with ``--workers`` dask worker processes
(``pipeline/distributed.py``), end to end (cluster start, model loads, stream, finalize), and checks that both
stores hold the same index arrays. On a 2-core machine this shows the overhead of the cluster, not a speed-up.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

PRESETS = {  # LlamaConfig fields; realistic sizes for a GPU throughput run
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
    "llama-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                     num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=8192, max_position_embeddings=1024),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=512),
}
WORDS = ("the of and to in a is that for it as was with be by on not he I this are or his from at which but "
         "have an they you were her she there been one all we their has would when if so no will more what "
         "king lord love death night heart blood sweet honour crown fair sword grace tongue fortune").split()


def synthetic_corpus(directory: Path, n_words: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    path = directory / "synthetic.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS, 2000)) for _ in range(max(1, n_words // 2000))))
    return path


def train_tokenizer(directory: Path, text_file: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train([str(text_file)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.save_pretrained(str(directory))
    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def random_lm(config: str, directory: Path, text_file: Path, device: str, dtype: str):
    """A random-weight Llama built from a preset/JSON config, wrapped like load_lm would."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from saeforge.pipeline.lm import DTYPES, wrap_hf_model

    fields = PRESETS[config] if config in PRESETS else json.loads(Path(config).read_text())
    tok = train_tokenizer(directory, text_file, min(8192, fields.get("vocab_size", 8192)))
    cfg = LlamaConfig(**fields, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    cfg.save_pretrained(str(directory))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(DTYPES[dtype]).eval()
    return wrap_hf_model(model, tok, name=f"random:{config}", source=str(directory),
                         info={"source": "random", "config": config}, device=device, dtype=dtype)


def sync(lm):
    import torch

    if lm.device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_tps(lm, batches, stop_at_layer):
    """Tokens/s of the bare forward over the prepared batches (tokens already on the host)."""
    import torch

    sync(lm)
    t = time.perf_counter()
    with torch.inference_mode():
        for tokens in batches:
            lm.bridge(tokens.to(lm.device, non_blocking=True), stop_at_layer=stop_at_layer, return_type=None)
    sync(lm)
    return sum(b.numel() for b in batches) / (time.perf_counter() - t)


class GpuSampler:
    """Mean GPU utilisation (%) while active, sampled every 100 ms."""

    def __init__(self, enabled: bool):
        self.enabled, self.samples, self.stop = enabled, [], threading.Event()

    def __enter__(self):
        if self.enabled:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
        return self

    def _run(self):
        import torch

        while not self.stop.wait(0.1):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=2).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                try:
                    self.samples.append(float(torch.cuda.utilization()))
                except Exception:  # noqa: BLE001 (no pynvml either: report nothing)
                    return

    def __exit__(self, *exc):
        self.stop.set()
        if self.enabled:
            self.thread.join()

    @property
    def mean(self):
        return statistics.mean(self.samples) if self.samples else float("nan")


def harvest_tps(lm, cfg, sites, tmp: Path, tag: str, gpu: bool):
    from saeforge.pipeline.harvest import harvest

    run = replace(cfg, sites=tuple(sites), out=str(tmp / f"{tag}-{time.monotonic_ns()}"))
    with GpuSampler(gpu) as s:
        r = harvest(run, lm=lm, progress=False)
    return r.tokens_per_s, r.tokens_forwarded / (r.lm_s + r.write_s), s.mean, r


def show(tag, dtype, r, key, value):
    """One measurement, printed (and flushed) as soon as it is taken: a timeout still leaves these."""
    unit = "%" if key.startswith("gpu") else "tok/s"
    print(f"  {dtype:<9} repeat {r}  {key:<9}{value:>12,.0f} {unit}", flush=True)


def measure(lm, cfg, batches, layer, tmp, repeats, gpu, with_full, dtype=""):
    out = {k: [] for k in ("bare", "full", "h1", "h1_close", "h3", "gpu1", "gpu3")}
    bare_tps(lm, batches[:2], layer + 1)  # warm-up: kernels, allocator
    warm = replace(cfg, tokens=min(cfg.tokens, 2 * int(batches[0].numel())))
    harvest_tps(lm, warm, ["resid_post", "mlp_out", "attn_out"], tmp, "warm", False)  # warm-up: pinned buffers
    for r in range(repeats):  # interleaved, medians: the machine is shared and noisy
        takes = [("bare", bare_tps(lm, batches, layer + 1))]
        if with_full and r == 0:  # once: it is the slowest measurement and only shows what stop_at_layer saves
            takes.append(("full", bare_tps(lm, batches, None)))
        tps, with_close, util, _ = harvest_tps(lm, cfg, ["resid_post"], tmp, "h1", gpu)
        takes += [("h1", tps), ("h1_close", with_close), ("gpu1", util)]
        tps, _, util, _ = harvest_tps(lm, cfg, ["resid_post", "mlp_out", "attn_out"], tmp, "h3", gpu)
        takes += [("h3", tps), ("gpu3", util)]
        for key, value in takes:
            if key.startswith("gpu") and not gpu:
                continue
            out[key].append(value)
            show("", dtype, r, key, value)
    return {k: statistics.median(v) for k, v in out.items() if v}


def run_stream(args):
    import torch

    from saeforge.pipeline.batches import window_batches
    from saeforge.pipeline.data import describe_dataset
    from saeforge.pipeline.harvest import HarvestConfig, harvest_provenance
    from saeforge.pipeline.lm import load_lm, resolve_device

    device = resolve_device(args.device)
    gpu = device.startswith("cuda")
    tmp = Path(tempfile.mkdtemp(prefix="bench_harvest_"))
    n_tokens = args.batches * args.batch_size * args.context_size
    dataset = args.dataset
    if dataset == "synthetic":
        os.environ["SAEFORGE_CACHE"] = str(tmp / "cache")  # its token cache goes with the temporary corpus
    if dataset == "synthetic":  # enough words for the passes (+ held-out windows), no more: ~1 word per token
        dataset = str(synthetic_corpus(tmp, int(1.2 * n_tokens) + 20_000))
    tok_text = synthetic_corpus(tmp / "tok", 200_000)  # the BPE is trained on a small sample, fast

    def load(dtype):
        if args.model_config:
            return random_lm(args.model_config, tmp / f"model-{dtype}", tok_text, device, dtype)
        return load_lm(args.model, device=device, dtype=dtype)

    results, lms = {}, {}
    for dtype in ["float32"] + ([] if args.no_bf16 else ["bfloat16"]):
        t = time.perf_counter()
        lm = lms[dtype] = load(dtype)
        load_s = time.perf_counter() - t
        # rows per harvest = exactly the kept rows of `batches` passes, so harvest runs the same passes
        cfg = HarvestConfig(out="", model=lm.name, device=device, lm_dtype=dtype, layers=(args.layer,),
                            sites=("resid_post",), dataset=dataset, context_size=args.context_size,
                            batch_size=args.batch_size, store_dtype="bfloat16", queue_batches=4)
        prov = harvest_provenance(cfg, lm, [f"blocks.{args.layer}.hook_resid_post"], describe_dataset(dataset))
        stream = list(zip(range(args.batches), window_batches(prov.text, lm.tokenizer, args.batch_size, 10**12)))
        batches = [b.windows for _, b in stream]
        cfg = replace(cfg, tokens=sum(int(b.kept.sum()) for _, b in stream))
        results[dtype] = measure(lm, cfg, batches, args.layer, tmp, args.repeats, gpu,
                                 with_full=not args.no_full and dtype == "float32", dtype=dtype)
        results[dtype]["load_s"] = load_s
        del lm, lms[dtype]
        if gpu:
            torch.cuda.empty_cache()
    shutil.rmtree(tmp, ignore_errors=True)
    report(results, args, device)


def report(results, args, device):
    import torch

    f32 = results["float32"]
    name = args.model_config and f"random Llama ({args.model_config})" or args.model
    dev = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"model {name}, device {dev}, layer {args.layer}, ctx {args.context_size}, batch {args.batch_size}, "
          f"{args.batches} passes x {args.repeats} repeats (medians)")
    print(f"{'':<28}{'tok/s':>12}{'ratio':>10}")
    rows = [("bare stop_at_layer fp32", f32["bare"], 1.0)]
    if "full" in f32:
        rows.append(("full forward fp32", f32["full"], f32["full"] / f32["bare"]))
    rows += [("harvest 1 site fp32", f32["h1"], f32["h1"] / f32["bare"]),
             ("harvest 1 site incl. close", f32["h1_close"], f32["h1_close"] / f32["bare"]),
             ("harvest 3 sites fp32", f32["h3"], f32["h3"] / f32["bare"])]
    if "bfloat16" in results:
        b16 = results["bfloat16"]
        rows += [("bare stop_at_layer bf16", b16["bare"], b16["bare"] / f32["bare"]),
                 ("harvest 1 site bf16", b16["h1"], b16["h1"] / f32["bare"])]
    for label, tps, ratio in rows:
        print(f"{label:<28}{tps:>12,.0f}{ratio:>9.2f}x")
    print(f"harvest1 / bare (fp32)        {f32['h1'] / f32['bare']:.2f}x   (target >= 0.90)")
    print(f"cost of 3 sites / 1 site      {f32['h1'] / f32['h3']:.2f}x   (target <= 1.10)")
    if "full" in f32:
        print(f"stop_at_layer speed-up        {f32['bare'] / f32['full']:.2f}x over the full forward")
    if "bfloat16" in results:
        b16 = results["bfloat16"]
        print(f"bf16 / fp32 LM compute        {b16['bare'] / f32['bare']:.2f}x bare, "
              f"{b16['h1'] / f32['h1']:.2f}x harvest; bf16 harvest1 / bare {b16['h1'] / b16['bare']:.2f}x")
    if device.startswith("cuda"):
        print(f"GPU utilisation during harvest: 1 site {f32['gpu1']:.0f}%, 3 sites {f32['gpu3']:.0f}%")
    sys.stdout.flush()


# --- section finalize: the writer's second pass ------------------------------------------------------------
def stage_input(path: Path, args) -> None:
    """A store whose rows are all staged (phase ``staging``, nothing written yet): random normal bf16 rows."""
    from saeforge.stores import StoreWriter

    rng = np.random.default_rng(0)
    w = StoreWriter(path, {"blocks.10.hook_resid_post": args.d}, dtype="bfloat16", seed=0,
                    expected_rows=args.rows, memory_limit_bytes=args.memory_mb << 20)
    for lo in range(0, args.rows, 1 << 16):
        n = min(1 << 16, args.rows - lo)
        rows = rng.standard_normal((n, args.d), dtype=np.float32)
        w.append({"blocks.10.hook_resid_post": rows}, token_ids=np.arange(lo, lo + n))
    w._stager.flush()  # the rows still buffered; then stop before close() so every copy starts from here
    w.abort()


def finalize_once(path: str, workers: int, kind: str, args) -> dict:
    """In a process of its own (``--finalize-one``): reopen the staged copy and close it. Seconds, CPU seconds
    (this process and its workers) and the peak of their summed RSS, sampled every 50 ms."""
    import psutil  # a dependency of distributed

    from saeforge.stores import StoreWriter

    me, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.wait(0.05):
            try:
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in [me, *me.children(recursive=True)]))
            except psutil.Error:  # a worker that just exited
                pass

    w = StoreWriter(path, {"blocks.10.hook_resid_post": args.d}, dtype="bfloat16", seed=0, expected_rows=args.rows,
                    memory_limit_bytes=args.memory_mb << 20, finalize_workers=workers, finalize_executor=kind)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    w.close()
    seconds = time.perf_counter() - t
    done.set()
    cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    return {"seconds": seconds, "cpu_s": cpu, "peak_rss_mib": peak[0] / 2**20}


def busy_cores(seconds: float = 3.0) -> float:
    """Cores busy over the next ``seconds`` (from /proc/stat; 0.0 where there is none): other users' work."""
    def ticks():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # all, idle + iowait

    if not Path("/proc/stat").exists():
        return 0.0
    (total0, idle0), _ = ticks(), time.sleep(seconds)
    total1, idle1 = ticks()
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(1, total1 - total0))


def wait_until_idle(max_busy: float, timeout: float) -> float:
    """Wait (up to ``timeout`` s) until fewer than ``max_busy`` cores are busy; the last reading."""
    deadline, busy = time.monotonic() + timeout, busy_cores()
    while busy > max_busy and time.monotonic() < deadline:
        busy = busy_cores()
    return busy


def store_digest(path: Path) -> str:
    """sha256 over every file of a complete store (path and bytes)."""
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(path)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def run_finalize(args):
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="bench_finalize_"))
    staged = tmp / "staged"
    t = time.perf_counter()
    stage_input(staged, args)
    print(f"staged {args.rows:,} rows of d={args.d} bf16 in {time.perf_counter() - t:.0f} s", flush=True)
    cores = os.cpu_count() or 1
    variants = [(1, "threads"), (cores, "threads"), (cores, "processes")]
    rows, digests = [], {}
    for r in range(args.finalize_repeats):  # interleaved: the machine is shared and noisy
        for workers, kind in variants:
            copy = tmp / f"copy-{workers}-{kind}"
            shutil.copytree(staged, copy)
            # other users of the cores (a shared machine): wait for a quiet moment, and record what was seen
            busy = wait_until_idle(args.max_busy, args.wait_idle) if args.wait_idle else busy_cores()
            out = subprocess.run([sys.executable, __file__, "--finalize-one", str(copy), str(workers), kind,
                                  "--memory-mb", str(args.memory_mb), "--rows", str(args.rows), "--d", str(args.d)],
                                 capture_output=True, text=True, check=True)
            m = json.loads(out.stdout.strip().splitlines()[-1])
            m.update(section="finalize", repeat=r, workers=workers, executor=kind, rows=args.rows, d=args.d,
                     rows_per_s=args.rows / m["seconds"], busy_cores_before=round(busy, 2))
            digests.setdefault(f"{workers}-{kind}", store_digest(copy))
            shutil.rmtree(copy)
            rows.append(m)
            print(json.dumps(m), flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    report_finalize(args, rows, digests, variants)


def report_finalize(args, rows, digests, variants):
    def of(workers, kind):
        return [m for m in rows if (m["workers"], m["executor"]) == (workers, kind)]

    def rates(workers, kind):
        return [m["rows_per_s"] for m in of(workers, kind)]

    def busy(workers, kind):  # cores kept busy: CPU seconds of the process and its workers per wall second
        return statistics.median(m["cpu_s"] / m["seconds"] for m in of(workers, kind))

    serial = rates(1, "threads")
    summary = {f"{w}-{k}": {"median_rows_per_s": statistics.median(rates(w, k)), "best_rows_per_s": max(rates(w, k)),
                            "median_ratio": statistics.median(rates(w, k)) / statistics.median(serial),
                            "best_ratio": max(rates(w, k)) / max(serial), "median_cores_busy": busy(w, k)}
               for w, k in variants}
    cpu = _cpu()
    same = len(set(digests.values())) == 1
    # one worker already overlaps its gathering with zarr's encoding threads: all cores can give at most this
    ceiling = (os.cpu_count() or 1) / max(1.0, busy(1, "threads"))
    result = {"cpu": cpu, "cores": os.cpu_count(), "rows": args.rows, "d": args.d, "memory_mb": args.memory_mb,
              "folder": str(args.tmp or tempfile.gettempdir()), "same_bytes": same, "summary": summary,
              "ceiling_ratio": ceiling, "measurements": rows}
    out = Path(args.results)  # one entry per --label: runs in other folders (disk, tmpfs) sit side by side
    runs = json.loads(out.read_text()) if out.exists() else {}
    runs[args.label] = result
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(runs, indent=1) + "\n")
    print(f"finalize of {args.rows:,} rows x {args.d} bf16 in {result['folder']}, {args.finalize_repeats} repeats, "
          f"{cpu}, {os.cpu_count()} cores; every variant wrote the same bytes: {same}")
    print(f"  {'':<14}{'median rows/s':>14}{'ratio':>8}{'best rows/s':>13}{'ratio':>8}{'cores busy':>12}")
    for key, v in summary.items():
        print(f"  {key:<14}{v['median_rows_per_s']:>14,.0f}{v['median_ratio']:>7.2f}x"
              f"{v['best_rows_per_s']:>13,.0f}{v['best_ratio']:>7.2f}x{v['median_cores_busy']:>12.2f}")
    print(f"  one worker keeps {busy(1, 'threads'):.2f} cores busy, so {os.cpu_count()} cores can give it at most "
          f"{ceiling:.2f}x (target 1.7x)")
    print(f"results in {args.results} [{args.label!r}]")


def run_distributed(args):
    """Single process vs ``--workers`` dask workers, the same harvest end to end."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from saeforge.pipeline.harvest import HarvestConfig, harvest
    from saeforge.stores import open_store

    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="bench_distributed_"))
    model_dir, corpus = tmp / "model", synthetic_corpus(tmp, int(1.3 * args.dist_tokens) + 20_000)
    tok = train_tokenizer(model_dir, synthetic_corpus(tmp / "tok", 200_000), 4096)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**PRESETS[args.model_config or "small"], "vocab_size": len(tok)},
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(model_dir)
    base = HarvestConfig(out=str(tmp / "unused"), model=str(model_dir), device="cpu", lm_dtype="float32", dataset=str(corpus),
                         layers=(2,), sites=("resid_post", "mlp_out"), tokens=args.dist_tokens,
                         context_size=args.context_size, batch_size=args.batch_size, store_dtype="bfloat16")
    runs = {}
    for name, workers in (("single", 0), (f"{args.workers}-workers", args.workers)):
        t = time.perf_counter()
        r = harvest(replace(base, out=str(tmp / name), workers=workers), progress=False)
        runs[name] = {"wall_s": time.perf_counter() - t, "stream_s": r.lm_s, "finalize_s": r.write_s,
                      "rows": r.rows, "load_before": os.getloadavg()[0]}
        print(json.dumps({"section": "distributed", "run": name, **runs[name]}), flush=True)
    stores = [open_store(tmp / name) for name in runs]
    same = all(np.array_equal(getattr(stores[0], f)(), getattr(stores[1], f)()) for f in ("token_ids", "seq_idx", "pos"))
    single, dist = runs["single"], runs[f"{args.workers}-workers"]
    result = {"cpu": _cpu(), "cores": os.cpu_count(), "model": args.model_config or "small", "runs": runs,
              "same_index_arrays": same, "wall_ratio": single["wall_s"] / dist["wall_s"],
              "stream_ratio": single["stream_s"] / dist["stream_s"]}
    Path(args.dist_results).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.dist_tokens:,} rows, {_cpu()}, {os.cpu_count()} cores: single {single['wall_s']:.1f} s end to end "
          f"(stream {single['stream_s']:.1f}, finalize {single['finalize_s']:.1f}); {args.workers} dask workers "
          f"{dist['wall_s']:.1f} s (stream {dist['stream_s']:.1f}, finalize {dist['finalize_s']:.1f}); "
          f"single/distributed wall {result['wall_ratio']:.2f}x; same index arrays: {same}")
    shutil.rmtree(tmp, ignore_errors=True)


def _cpu() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())


SECTIONS = {"stream": run_stream, "finalize": run_finalize, "distributed": run_distributed}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--section", choices=sorted(SECTIONS), default="stream")
    s = ap.add_argument_group("section stream")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--model-config", default=None, help=f"random-weight Llama: {', '.join(PRESETS)} or a JSON file")
    s.add_argument("--device", default="auto")
    s.add_argument("--dataset", default="shakespeare", help="shakespeare, synthetic, or any harvest --dataset")
    s.add_argument("--layer", type=int, default=10)
    s.add_argument("--context-size", type=int, default=128)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--batches", type=int, default=8, help="forward passes per measurement (after a warm-up of 2)")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--no-bf16", action="store_true")
    s.add_argument("--no-full", action="store_true")
    f = ap.add_argument_group("section finalize")
    f.add_argument("--rows", type=int, default=2_000_000)
    f.add_argument("--d", type=int, default=576)
    f.add_argument("--memory-mb", type=int, default=1024, help="the writer's memory_limit_bytes, in MiB")
    f.add_argument("--finalize-repeats", type=int, default=2)
    f.add_argument("--wait-idle", type=float, default=0, help="before each measurement wait up to this many seconds "
                   "until fewer than --max-busy cores are busy with other work (a shared machine)")
    f.add_argument("--max-busy", type=float, default=0.2)
    f.add_argument("--tmp", default=None, help="folder for the staged input and its copies (default: a temp dir)")
    f.add_argument("--results", default=str(Path(__file__).parent / "results" / "bench_harvest_finalize.json"))
    f.add_argument("--label", default="disk", help="the run's key in --results (e.g. disk, tmpfs)")
    d = ap.add_argument_group("section distributed (also --model-config, --context-size, --batch-size, --tmp)")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--dist-tokens", type=int, default=200_000)
    d.add_argument("--dist-results", default=str(Path(__file__).parent / "results" / "bench_harvest_distributed.json"))
    ap.add_argument("--finalize-one", nargs=3, metavar=("PATH", "WORKERS", "EXECUTOR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.finalize_one:
        path, workers, kind = args.finalize_one
        print(json.dumps(finalize_once(path, int(workers), kind, args)))
        return
    SECTIONS[args.section](args)


if __name__ == "__main__":
    main()
