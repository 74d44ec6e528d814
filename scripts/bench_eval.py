"""Benchmark: K SAEs at one hook, shared-prefix evaluation vs one full forward per replacement.

    python scripts/bench_eval.py [--model smollm2-135m] [--hook blocks.10.hook_resid_post] [--k 8]

Both strategies run the same `evaluate_hooks` on the same tokens with the same K freshly initialised SAEs
(random weights are fine for timing) and must give the same numbers. Two comparisons, each the best of
`--repeats` alternating runs:
  warm cache: ablation CEs already known (the steady state of a sweep): clean + K replacements per batch;
  cold cache: zero and mean ablation computed too: clean + 2 + K replacements per batch.
Prints the ratio naive / shared for each, and the FLOP-model bound for this model and hook.
"""
from __future__ import annotations

import argparse
import functools
import time

import torch

print = functools.partial(print, flush=True)  # noqa: A001 (progress of a long benchmark shows as it goes)


def _best(fn, repeats: int) -> tuple[float, dict]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _bound(n_layers: int, resume: int, d: int, d_mlp: int, vocab: int, k: int) -> float:
    """Naive / shared under a parameter-FLOP model (attention scores ignored): blocks ~ 4d^2+3d*d_mlp each."""
    block, unembed = 4 * d * d + 3 * d * d_mlp, d * vocab
    full = n_layers * block + unembed
    suffix = (n_layers - resume) * block + unembed
    return k * full / (resume * block + k * suffix)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--hook", default="blocks.10.hook_resid_post")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from saeforge.pipeline.evaluate import evaluate_hooks, plan_splice
    from saeforge.pipeline.lm import load_lm
    from saeforge.trainer.sae import make_sae

    torch.set_grad_enabled(False)
    lm = load_lm(args.model, device=args.device)
    d = lm.info["d_model"]
    saes = []
    for i in range(args.k):
        torch.manual_seed(i)
        saes.append(make_sae("gated" if i % 2 else "baseline", d, args.d_sae).to(lm.device).eval())
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, lm.info["d_vocab"], (args.batches * args.batch_size, args.context), generator=g)
    tokens[:, 0] = lm.tokenizer.bos_token_id
    kept = tokens != lm.tokenizer.bos_token_id
    batches = list(zip(tokens.split(args.batch_size), kept.split(args.batch_size)))
    mean = {args.hook: torch.zeros(d)}

    def run(strategy, known=None):
        return evaluate_hooks(lm.bridge, batches, {args.hook: saes}, means=mean, known=known,
                              strategy=strategy)[args.hook]

    cold_ref = run("shared_prefix")  # warm-up, and the ablation CEs for the warm-cache runs
    known = {args.hook: cold_ref.ablation}
    print(f"model {args.model} on {lm.device}, hook {args.hook}, K={args.k} SAEs (d_sae {args.d_sae}), "
          f"{tokens.numel()} tokens ({args.batches} batches of {args.batch_size}x{args.context})")
    results = {}
    for label, kn in (("warm cache (clean + K)", known), ("cold cache (clean + zero + mean + K)", None)):
        t_full, full = _best(lambda: run("full", kn), args.repeats)
        t_shared, shared = _best(lambda: run("shared_prefix", kn), args.repeats)
        diff = max(abs(a.ce - b.ce) for a, b in zip(full.saes, shared.saes))
        results[label] = t_full / t_shared
        print(f"{label:38s} naive {t_full:7.2f} s   shared prefix {t_shared:7.2f} s   "
              f"ratio {t_full / t_shared:5.2f}x   max |dCE| {diff:.2e}")
    cfg = lm.bridge.cfg
    resume = plan_splice(args.hook, cfg.n_layers).resume or 0
    bound = _bound(cfg.n_layers, resume, d, cfg.d_mlp, cfg.d_vocab, args.k)
    print(f"FLOP-model bound for K spliced forwards vs prefix(0..{resume - 1}) + K suffixes: {bound:.2f}x")


if __name__ == "__main__":
    main()
