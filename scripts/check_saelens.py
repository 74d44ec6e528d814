"""Does SAELens load saeforge run directories and compute the same SAE? (a check, not a test)

    python -m venv /tmp/saelens-venv && /tmp/saelens-venv/bin/pip install torch==2.13.0  # CPU wheel first
    /tmp/saelens-venv/bin/pip install -e ".[test]" "sae-lens==6.54.12"                     # beside saeforge
    python scripts/check_saelens.py --saelens-python /tmp/saelens-venv/bin/python
    python scripts/check_saelens.py --saelens-python /tmp/saelens-venv/bin/python --run runs/g1 --run runs/b1

SAELens runs as a subprocess of `--saelens-python`: any interpreter with sae-lens installed, such as a venv where
it sits beside saeforge (sae-lens 6.54 pins transformer-lens < 4, which saeforge supports; CI's second venv runs
`tests/test_saelens_real.py` there), or this script's own python when that venv runs it. Without `--run` the
script writes a small float32 store (20k rows, d_in 64) and trains one baseline and one gated SAE with
`saeforge train` under `--dir`. For each run it evaluates our `load_sae` on the same inputs (store rows plus
Gaussian rows at the store's scale), hands x and our outputs over as .npy files, and has SAELens's
`SAE.load_from_disk` compute encode / decode / forward. Prints one JSON line per run (max abs and max
relative differences, features whose active/inactive state differs) and exits 1 when any run fails to load
or differs beyond `--rtol`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

HOOK = "blocks.1.hook_resid_post"

SAELENS_SIDE = r"""
import json, sys, numpy as np, torch
from sae_lens import SAE, __version__
run_dir, work = sys.argv[1], sys.argv[2]
sae = SAE.load_from_disk(run_dir, device="cpu")
x = torch.from_numpy(np.load(f"{work}/x.npy"))
f_ours, xhat_ours, fwd_ours = (np.load(f"{work}/{n}.npy") for n in ("f", "xhat", "fwd"))
with torch.no_grad():
    f = sae.encode(x).numpy()
    xhat = sae.decode(torch.from_numpy(f_ours)).numpy()   # decode OUR features: isolates the decoder
    fwd = sae(x).numpy()
def diff(a, b):
    return {"max_abs": float(np.abs(a - b).max()), "max_rel": float(np.abs(a - b).max() / np.abs(b).max())}
cfg = sae.cfg
print(json.dumps({"sae_lens": __version__, "class": type(sae).__name__, "architecture": cfg.architecture(),
    "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
    "normalize_activations": cfg.normalize_activations, "hook_name": cfg.metadata.hook_name,
    "model_name": cfg.metadata.model_name,
    "encode": diff(f, f_ours), "decode": diff(xhat, xhat_ours), "forward": diff(fwd, fwd_ours),
    "active_mismatch": int(((f > 0) != (f_ours > 0)).sum()), "active_frac": float((f_ours > 0).mean())}))
"""


def build_runs(work: Path, steps: int) -> list[Path]:
    """A synthetic float32 store (sparse combinations of 256 directions plus an offset) and two runs."""
    from saeforge.stores import StoreWriter
    from saeforge.trainer.rundir import WEIGHTS_FILE

    store = work / "store.zarr"
    if not store.exists():
        rng = np.random.default_rng(0)
        n, d = 20_000, 64
        dirs = rng.standard_normal((256, d)).astype(np.float32)
        codes = rng.exponential(1.0, (n, 256)).astype(np.float32) * (rng.random((n, 256)) < 0.05)
        x = (codes @ dirs + 3 * rng.standard_normal(d) + 0.3 * rng.standard_normal((n, d))).astype(np.float32) * 5
        with StoreWriter(str(store), hooks={HOOK: d}, dtype="float32", seed=0, expected_rows=n,
                         provenance={"model": "synthetic", "context_size": 128, "prepend_bos": True}) as w:
            ids = np.arange(n)
            w.append({HOOK: x}, token_ids=ids % 1000, seq_idx=ids // 128, pos=ids % 128)
    runs = []
    for arch in ("baseline", "gated"):
        run = work / arch
        if not (run / WEIGHTS_FILE).exists():
            subprocess.run([str(Path(sys.executable).with_name("saeforge")), "train", "--store", str(store),
                            "--hook", HOOK, "--arch", arch, "--d-sae", "256", "--steps", str(steps),
                            "--batch-rows", "512", "--lr", "1e-3", "--lr-warmup-steps", "20",
                            "--resample-every", "0", "--device", "cpu", "--quiet", "--out", str(run)],
                           check=True, stdout=subprocess.DEVNULL)
        runs.append(run)
    return runs


def our_outputs(run: Path, work: Path, n_random: int) -> None:
    """x (store rows + Gaussian rows at the store's scale) and our f, decode(f), forward(x) as .npy."""
    import torch

    from saeforge.stores import open_store
    from saeforge.trainer.saelens_files import load_sae

    sae, info = load_sae(run)
    gen = torch.Generator().manual_seed(0)
    parts = []
    try:
        store = open_store(info.store)
        parts.append(store.read(info.hook_name, 0, min(store.n_rows, 2048)))
        st = store.stats(info.hook_name)
        mean, rms = torch.from_numpy(st.mean).float(), (st.mean_sq_norm / info.d_in) ** 0.5
    except Exception as e:  # the store may be gone: random inputs still test the arithmetic
        print(f"note: {run}: store not readable ({e}); random inputs only", file=sys.stderr)
        mean, rms = torch.zeros(info.d_in), 1.0
    parts.append(mean + rms * torch.randn(n_random, info.d_in, generator=gen))
    x = torch.cat(parts).float()
    with torch.no_grad():
        f = sae.encode(x)
        outs = {"x": x, "f": f, "xhat": sae.decode(f), "fwd": sae(x)}
    for name, t in outs.items():
        np.save(work / f"{name}.npy", t.numpy())


def check(run: Path, saelens_python: str, work: Path, n_random: int, rtol: float) -> bool:
    io_dir = work / f"io_{run.name}"
    io_dir.mkdir(parents=True, exist_ok=True)
    our_outputs(run, io_dir, n_random)
    proc = subprocess.run([saelens_python, "-c", SAELENS_SIDE, str(run), str(io_dir)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(json.dumps({"run": str(run), "loaded": False, "error": proc.stderr.strip().splitlines()[-1:]}))
        print(proc.stderr, file=sys.stderr)
        return False
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ok = all(result[k]["max_rel"] <= rtol for k in ("encode", "decode", "forward"))
    print(json.dumps({"run": str(run), "loaded": True, "ok": ok, **result}))
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--saelens-python", required=True, help="python of a venv with sae-lens installed")
    p.add_argument("--run", action="append", type=Path, help="run directory (repeatable); default: train two")
    p.add_argument("--dir", type=Path, default=Path("/tmp/saeforge_check_saelens"), help="work directory")
    p.add_argument("--steps", type=int, default=400, help="training steps of the built runs")
    p.add_argument("--random-rows", type=int, default=2048, help="Gaussian rows added to the store rows")
    p.add_argument("--rtol", type=float, default=1e-5, help="max |diff| / max |ours| allowed")
    args = p.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    runs = args.run or build_runs(args.dir, args.steps)
    results = [check(r, args.saelens_python, args.dir, args.random_rows, args.rtol) for r in runs]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
