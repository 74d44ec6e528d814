"""Benchmark: K SAEs at one hook, shared-prefix evaluation vs one full forward per replacement.

    python scripts/bench_eval.py [--model smollm2-135m] [--hook blocks.10.hook_resid_post] [--k 8]
                                 [--batches 2 --batch-size 4 --context 128] [--repeats 1] [--cold]

The model and K freshly initialised SAEs (random weights are fine for timing) are built before anything is
timed, and every measurement uses the same tokens. Lines print as they are measured:
  model only: one clean full forward and one prefix pass (blocks 0..L) over the tokens, and from them what
    pure model work predicts for each strategy (naive: (K+1) full forwards; shared: prefix + (K+1) suffixes);
  naive / shared: `evaluate_hooks` with strategy `full` / `shared_prefix` and a warm ablation cache (the
    steady state of a sweep: clean + K replacements per batch), time and time / model-only prediction
    (1.00x: no overhead beyond the forwards), then naive / shared and the largest CE and KL difference;
  `--cold`: the same with zero and mean ablation computed too (clean + 2 + K replacements per batch);
  the FLOP-model bound for this model and hook.
Times are the best of `--repeats` alternating runs; on a shared machine compare the ratios, not the seconds.
"""
from __future__ import annotations

import argparse
import functools
import math
import time

import torch

print = functools.partial(print, flush=True)  # noqa: A001 (progress of a long benchmark shows as it goes)


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _bound(n_layers: int, resume: int, d: int, d_mlp: int, vocab: int, k: int) -> float:
    """Naive / shared under a parameter-FLOP model (attention scores ignored): blocks ~ 4d^2+3d*d_mlp each."""
    block, unembed = 4 * d * d + 3 * d * d_mlp, d * vocab
    full = n_layers * block + unembed
    suffix = (n_layers - resume) * block + unembed
    return (k + 1) * full / (resume * block + (k + 1) * suffix)


def _args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hook", default="blocks.10.hook_resid_post")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--cold", action="store_true", help="also compare with the ablation CEs computed")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads [torch's default]")
    ap.add_argument("--device", default="auto")
    return ap.parse_args()


def main():
    args = _args()
    from saeforge.pipeline.splice import AblationCE, evaluate_hooks, plan_splice
    from saeforge.pipeline.lm import load_lm
    from saeforge.trainer.sae import make_sae

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_lm(args.model, device=args.device)
    cfg, d = lm.bridge.cfg, lm.info["d_model"]
    saes = []
    for i in range(args.k):
        torch.manual_seed(i)
        saes.append(make_sae("gated" if i % 2 else "baseline", d, args.d_sae).to(lm.device).eval())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, cfg.d_vocab, (args.batches * args.batch_size, args.context), generator=g)
    tokens[:, 0] = lm.tokenizer.bos_token_id
    kept = tokens != lm.tokenizer.bos_token_id
    batches = [(t.to(lm.device), k.to(lm.device)) for t, k in zip(tokens.split(args.batch_size),
                                                                    kept.split(args.batch_size))]
    mean = {args.hook: torch.zeros(d)}
    resume = plan_splice(args.hook, cfg.n_layers).resume or 0
    warm = {args.hook: AblationCE(math.nan, math.nan, math.nan, 0)}  # values unused by the timed work

    def run(strategy, known):
        return evaluate_hooks(lm.bridge, batches, {args.hook: saes}, means=mean, known=known,
                              strategy=strategy)[args.hook]

    def best(fn):
        times, out = [], None
        for _ in range(args.repeats):
            t, out = _timed(fn)
            times.append(t)
        return min(times), out

    with torch.inference_mode():
        lm.bridge(batches[0][0][:1])  # warm-up: first-call allocations are not timed
        t_full, _ = best(lambda: [lm.bridge(t) for t, _ in batches])
        t_pre, _ = best(lambda: [lm.bridge(t, stop_at_layer=resume) for t, _ in batches])
    print(f"model {args.model} on {lm.device} ({torch.get_num_threads()} threads), hook {args.hook} "
          f"(suffix resumes at block {resume} of {cfg.n_layers}), K={args.k} SAEs (d_sae {args.d_sae}), "
          f"{tokens.numel()} tokens ({args.batches} batches of {args.batch_size}x{args.context})")
    print(f"model only: clean full forward {t_full:.2f} s ({tokens.numel() / t_full:.0f} tok/s), prefix to block "
          f"{resume} {t_pre:.2f} s ({tokens.numel() / t_pre:.0f} tok/s)")
    plans = [("warm cache (clean + K)", warm, args.k + 1)]
    if args.cold:
        plans.append(("cold cache (clean + zero + mean + K)", None, args.k + 3))
    for label, known, n_rep in plans:
        pred_full, pred_shared = n_rep * t_full, t_pre + n_rep * (t_full - t_pre)
        print(f"{label}: model-only prediction naive {pred_full:.2f} s, shared {pred_shared:.2f} s "
              f"(ratio {pred_full / pred_shared:.2f}x)")
        t_naive, naive = best(lambda: run("full", known))
        print(f"  naive ({n_rep} full forwards/batch)    {t_naive:7.2f} s  = {t_naive / pred_full:.2f}x model-only")
        t_shared, shared = best(lambda: run("shared_prefix", known))
        print(f"  shared prefix (1 prefix + {n_rep} suffixes) {t_shared:7.2f} s  = {t_shared / pred_shared:.2f}x "
              "model-only")
        d_ce = max(abs(a.ce - b.ce) for a, b in zip(naive.saes, shared.saes))
        d_kl = max(abs(a.kl - b.kl) for a, b in zip(naive.saes, shared.saes))
        print(f"  naive / shared {t_naive / t_shared:.2f}x   max |dCE| {d_ce:.2e}   max |dKL| {d_kl:.2e}")
    bound = _bound(cfg.n_layers, resume, d, cfg.d_mlp, cfg.d_vocab, args.k)
    print(f"FLOP-model bound (warm cache) for {args.k + 1} full forwards vs prefix(0..{resume - 1}) + "
          f"{args.k + 1} suffixes: {bound:.2f}x")


if __name__ == "__main__":
    main()
