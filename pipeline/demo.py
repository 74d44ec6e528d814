"""The main job as one idempotent function: harvest -> sweep -> eval -> plots -> report.md.

    run_demo("demo")                      # SmolLM2-135M layer 10, three sites, Gated vs baseline at equal compute
    run_demo("study", preset="study")     # the same at the size of the study (arXiv 2404.16014 Fig. 1 on SmolLM2)

Every stage is the stage's own idempotent command (harvest, sweep and eval each skip what is complete and
resume what is partial), so rerunning the demo after an interruption continues where it stopped, and rerunning
it after it finished only rewrites the report. Lambdas are given per architecture as a grid in NORMALISED units
(the loss on inputs scaled to E||x||^2 = d_in) and converted to the paper's units (raw activations, App. D.1)
with each hook's store scale s: Gated lambda_paper = lambda / s, baseline lambda_paper = lambda * s
(`trainer/losses.py: l1_training_factor`). One grid then means the same sparsity pressure at every site.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

SITES = ("resid_post", "mlp_out", "attn_out")


@dataclass(frozen=True, kw_only=True)
class Preset:
    """Sizes of one demo run (all stages)."""

    tokens: int
    """Rows harvested per hook."""
    layer: int = 10
    """Layer of SmolLM2-135M (30 layers) whose sites are harvested."""
    sites: tuple[str, ...] = SITES
    heldout_every: int = 10
    """Every 10th window is held out: Shakespeare has 12,321 windows of 128 tokens, so 157k held-out tokens."""
    context_size: int = 128
    harvest_batch: int = 16
    d_sae: int = 768
    """Gated width; baselines get 1.5x (equal compute, arXiv 2404.16014 §4.1)."""
    gated_l1: tuple[float, ...]
    """Gated lambdas in normalised units (converted per hook, see the module docstring)."""
    baseline_l1: tuple[float, ...]
    """Baseline lambdas in normalised units."""
    steps: int
    batch_rows: int = 1024
    lr_warmup_steps: int = 100
    l1_warmup_steps: int = 100
    resample_every: int = 0
    """0: steps // 8, so at most 4 resamples happen in the first half (resampling stops at steps / 2)."""
    resample_rows: int = 65536
    eval_tokens: int = 16384
    eval_batch: int = 16

    @property
    def resample_interval(self) -> int:
        return self.resample_every or max(1, self.steps // 8)

    @property
    def resample_lr_steps(self) -> int:
        """The LR returns from 0.1x to 1x over a quarter of the resampling interval, so it is back to full well
        before the next resample (the paper: 1,000 steps of a 25,000-step interval, App. D.1)."""
        return max(1, self.resample_interval // 4)


PRESETS = {
    # Sized for <= 30 minutes on a 2-core CPU in fp32: 3 sites x (2 Gated + 2 baseline), 0.3M tokens, 8k eval
    # tokens (eval dominates: every SAE reruns the 20 blocks after layer 10 and the unembedding).
    "demo": Preset(tokens=300_000, d_sae=512, gated_l1=(2e-3, 8e-3), baseline_l1=(3e-6, 1.2e-5), steps=800,
                   eval_tokens=8192),
    # The study: 3 sites x 2 architectures x 5 lambdas from one 1M-token harvest, 2^17 eval tokens.
    "study": Preset(tokens=1_000_000, d_sae=768, gated_l1=(1.2e-3, 2.4e-3, 4.8e-3, 9.6e-3, 1.9e-2),
                    baseline_l1=(1.7e-6, 2.9e-6, 5e-6, 8.6e-6, 1.5e-5), steps=2000, eval_tokens=2 ** 17),
    # For a GPU: wider SAEs, more text (a HF dataset through `saeforge harvest` is the way beyond Shakespeare).
    "paper": Preset(tokens=1_300_000, d_sae=4608, gated_l1=(1.2e-3, 2.4e-3, 4.8e-3, 9.6e-3, 1.9e-2),
                    baseline_l1=(1.7e-6, 2.9e-6, 5e-6, 8.6e-6, 1.5e-5), steps=20_000, batch_rows=4096,
                    eval_tokens=2 ** 17, harvest_batch=64, eval_batch=64),
}


@dataclass
class StageTimes:
    """Wall seconds per stage of this invocation (a stage that found its output complete costs ~0)."""

    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn):
        print(f"== {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        result = fn()
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        return result


def sweep_saes(preset: Preset, scales: dict[str, float]) -> list:
    """Gated and baseline SAEs for every hook at equal compute, lambdas converted to the paper's units."""
    from saeforge.trainer.config import SAEConfig
    from saeforge.trainer.grid import EQUAL_COMPUTE_FACTOR

    saes = []
    for hook, s in scales.items():
        saes += [SAEConfig(hook=hook, arch="gated", d_sae=preset.d_sae, l1_coefficient=float(f"{lam / s:.4g}"))
                 for lam in preset.gated_l1]
        saes += [SAEConfig(hook=hook, arch="baseline", d_sae=round(EQUAL_COMPUTE_FACTOR * preset.d_sae),
                           l1_coefficient=float(f"{lam * s:.4g}")) for lam in preset.baseline_l1]
    return saes


def run_demo(out: str | Path, *, preset: str | Preset = "demo", dtype: str = "auto", device: str = "auto",
             model: str = "smollm2-135m", dataset: str = "shakespeare", progress: bool = True,
             plot_format: str = "png") -> dict:
    """Run (or continue, or confirm) the demo in `out`; returns what `demo.json` records. `preset` is a name in
    `PRESETS` or a `Preset`; `model` and `dataset` take what `saeforge harvest` takes; the plots are
    `plot_format` files (png, svg or pdf)."""
    from saeforge.pipeline.evaluate import EvalConfig, evaluate_runs
    from saeforge.pipeline.harvest import HarvestConfig, harvest
    from saeforge.pipeline.paths import check_output_dir
    from saeforge.pipeline.plots import plot_sweep
    from saeforge.pipeline.report import write_report
    from saeforge.stores import open_store
    from saeforge.trainer.config import TrainConfig
    from saeforge.trainer.device import cpu_name, resolve_device, resolve_dtype
    from saeforge.trainer.run import train_from_store

    p = PRESETS[preset] if isinstance(preset, str) else preset
    check_output_dir(out, "OUT")  # before anything is made: bad input leaves no folder behind
    compute = resolve_dtype(dtype, device)  # an unknown or absent --device fails here
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    times = StageTimes()
    hcfg = HarvestConfig(out=str(out / "store"), model=model, dataset=dataset, device=device,
                         lm_dtype=compute, layers=(p.layer,), sites=p.sites, context_size=p.context_size,
                         batch_size=p.harvest_batch, heldout_every=p.heldout_every, tokens=p.tokens)
    times.run("harvest", lambda: harvest(hcfg, progress=progress))
    store = open_store(hcfg.out)
    scales = {h: float(store.stats(h).scale) for h in sorted(store.hooks)}
    saes = sweep_saes(p, scales)
    train = TrainConfig(steps=p.steps, batch_rows=p.batch_rows, lr_warmup_steps=p.lr_warmup_steps,
                        l1_warmup_steps=p.l1_warmup_steps, resample_every=p.resample_interval,
                        resample_lr_steps=p.resample_lr_steps, resample_rows=p.resample_rows,
                        autocast="bf16" if compute == "bfloat16" else "none", device=device,
                        checkpoint_every=max(50, p.steps // 8), log_every=max(10, p.steps // 40))
    sweep_dir = out / "sweep"
    times.run("sweep", lambda: train_from_store(hcfg.out, saes, train, sweep_dir, sweep=True, progress=progress))
    run_dirs = [sweep_dir / s.run_name for s in saes]
    ecfg = EvalConfig(tokens=p.eval_tokens, batch_size=p.eval_batch, device=device)  # in the store's dtype
    times.run("eval", lambda: evaluate_runs(run_dirs, ecfg, progress=progress))
    plots = times.run("plots", lambda: plot_sweep(sweep_dir, fmt=plot_format))
    record = {"preset": preset if isinstance(preset, str) else "custom", "model": model, "dataset": dataset,
              "config": asdict(p), "compute_dtype": compute,
              "device": str(resolve_device(device)), "cpu": cpu_name(), "stage_seconds": times.seconds,
              "store": hcfg.out, "sweep": str(sweep_dir), "plots": plots}
    times.run("report", lambda: write_report(out, record))
    record["stage_seconds"] = times.seconds
    (out / "demo.json").write_text(json.dumps(record, indent=1))
    return record
