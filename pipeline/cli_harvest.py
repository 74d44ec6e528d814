"""``saeforge harvest``: text -> LM (one pass, every hook) -> a shuffled activation store."""
from __future__ import annotations

import json

import click


def _csv(value: str | None, cast=str) -> tuple:
    if not value:
        return ()
    try:
        return tuple(cast(v.strip()) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected a comma-separated list, got {value!r}") from None


@click.command()
@click.option("--out", required=True, help="Store path or fsspec URL (rerun the same command to resume it).")
@click.option("--model", default="smollm2-135m", show_default=True,
              help="smollm2-135m (offline), a HF name, a local HF model directory, or a .gguf file.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if present), cpu, cuda, cuda:1, ...")
@click.option("--dtype", "lm_dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="dtype of the LM compute (auto: bfloat16 where the device runs it natively "
                                      "and faster, else float32).")
@click.option("--hooks", default=None, help="Comma-separated full hook names, e.g. blocks.10.hook_resid_post.")
@click.option("--layers", default=None, help="Comma-separated layers, with --sites, e.g. 6,10.")
@click.option("--sites", default=None,
              help="Comma-separated sites: resid_pre, resid_mid, resid_post, mlp_out, attn_out, attn.hook_z.")
@click.option("--dataset", default="shakespeare", show_default=True,
              help="shakespeare (offline), local txt/jsonl/parquet files, a directory or glob, or a HF "
                   "datasets name (name, name:config, name@revision; streamed).")
@click.option("--split", default="train", show_default=True, help="Split of a HF dataset.")
@click.option("--text-column", default="text", show_default=True, help="Text column (jsonl, parquet, HF).")
@click.option("--context-size", default=128, show_default=True, help="Tokens per window, BOS included.")
@click.option("--bos/--no-bos", "prepend_bos", default=True, show_default=True, help="Start each window with BOS.")
@click.option("--special-tokens", "special_token_rule", type=click.Choice(["exclude", "keep"]), default="exclude",
              show_default=True, help="Store rows at special-token positions (BOS, EOS, pad) or not.")
@click.option("--heldout-every", default=20, show_default=True,
              help="Every Nth window of the text is held out for evaluation and never stored.")
@click.option("--tokens", default=100_000, show_default=True, help="Rows (token positions) to store.")
@click.option("--batch-size", default=8, show_default=True, help="Windows per forward pass.")
@click.option("--store-dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="dtype of the stored activations.")
@click.option("--seed", default=0, show_default=True, help="Seed of the store's global shuffle.")
@click.option("--writer-memory-mb", default=1024, show_default=True, help="Memory bound of the shuffling writer.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of a summary.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def harvest(out, model, device, lm_dtype, hooks, layers, sites, dataset, split, text_column, context_size,
            prepend_bos, special_token_rule, heldout_every, tokens, batch_size, store_dtype, seed,
            writer_memory_mb, as_json, quiet):
    """Run the LM over text once and store the activations of every requested hook.

    All hooks come from ONE forward pass per batch that stops after the deepest requested layer. Rows at
    special-token positions are dropped by default; every --heldout-every-th window is never stored, so
    evaluation can draw unseen text. The store is globally shuffled, compressed and self-describing
    (provenance: model and hash, tokenizer, hooks, dataset and files, rules, seed). Interrupted? Rerun
    the same command: it resumes without recomputing what was staged; on a complete store it does nothing.
    Example:

        saeforge harvest --layers 10 --sites resid_post,mlp_out --tokens 1000000 --out stores/l10
    """
    from saeforge.pipeline.data import DatasetError
    from saeforge.pipeline.harvest import HarvestConfig, HarvestError
    from saeforge.pipeline.harvest import harvest as run_harvest
    from saeforge.pipeline.lm import HookError, ModelLoadError
    from saeforge.stores import StoreError

    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        cfg = HarvestConfig(out=out, model=model, device=device, lm_dtype=lm_dtype, hooks=_csv(hooks),
                            layers=_csv(layers, int), sites=_csv(sites), dataset=dataset, split=split,
                            text_column=text_column, context_size=context_size, prepend_bos=prepend_bos,
                            special_token_rule=special_token_rule, heldout_every=heldout_every, tokens=tokens,
                            batch_size=batch_size, store_dtype=store_dtype, seed=seed,
                            writer_memory_bytes=writer_memory_mb << 20)
        result = run_harvest(cfg, progress=not quiet)
    except (HarvestError, ModelLoadError, HookError, DatasetError, StoreError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted: {out} is incomplete; rerun the same command to resume") from None
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=1))
    else:
        click.echo(summary(result))


def summary(r) -> str:
    """A human summary of a HarvestResult."""
    lines = [f"store       {r.store}",
             f"rows        {r.rows:,} per hook ({r.rows_resumed:,} resumed from an earlier run)",
             f"LM          {r.forward_passes} forward passes, {r.tokens_forwarded:,} tokens, "
             f"{r.tokens_per_s:,.0f} tok/s",
             f"wall time   {r.wall_s:.1f} s (stream {r.lm_s:.1f} s, shuffle+write {r.write_s:.1f} s)",
             "bytes on disk per hook:"]
    lines += [f"  {h:<36} {n / 2**20:9.2f} MiB  ({n / max(r.rows, 1):.1f} B/row)"
              for h, n in sorted(r.bytes_per_hook.items())]
    return "\n".join(lines)
