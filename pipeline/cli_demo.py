"""``saeforge demo [OUT]``: the main job, offline, in one idempotent command."""
from __future__ import annotations

import json

import click


@click.command()
@click.argument("out", default="demo", type=click.Path(file_okay=False))
@click.option("--preset", type=click.Choice(["demo", "study", "paper"]), default="demo", show_default=True,
              help="demo: ~25 min on a 2-core CPU; study: 3 sites x 2 architectures x 6 lambdas, 2^17 eval "
                   "tokens; paper: wider SAEs and longer training, for a GPU.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="Compute dtype of every stage (auto: bfloat16 where the device runs it natively and faster).")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if present), cpu, cuda, cuda:1, ...")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out, preset, dtype, device, quiet):
    """Harvest SmolLM2-135M (layer 10: resid_post, mlp_out, attn_out in one pass) over Shakespeare, train
    Gated and baseline SAEs at equal compute for each site in one sweep, evaluate them on held-out text
    (loss recovered with paired-bootstrap intervals, L0, γ, ...), plot, and write OUT/report.md.

    Rerunning is safe: each stage skips what is complete and resumes what was interrupted. Prints one line
    per stage with its wall time; OUT/demo.json records them.

        saeforge demo            # into ./demo
    """
    from saeforge.pipeline.demo import run_demo
    from saeforge.pipeline.eval_runs import EvalError
    from saeforge.pipeline.plots import PlotError
    from saeforge.stores import StoreError
    from saeforge.trainer.errors import TrainerError

    try:
        record = run_demo(out, preset=preset, dtype=dtype, device=device, progress=not quiet)
    except (EvalError, PlotError, StoreError, TrainerError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted: rerun `saeforge demo {out} --preset {preset}` to continue") from None
    for stage, seconds in record["stage_seconds"].items():
        click.echo(f"{stage:<8} {seconds:8.1f} s")
    click.echo(f"report   {json.dumps(str(out) + '/report.md')}")
