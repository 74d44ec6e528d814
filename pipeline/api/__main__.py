"""`python -m saeforge`: the saeforge command, e.g. under torchrun for data-parallel training:

    torchrun --nproc-per-node 4 -m saeforge train --store acts/l10 --hook blocks.10.hook_resid_post --out runs/g1
"""
from saeforge.pipeline.cli import main

if __name__ == "__main__":
    main(prog_name="saeforge")
