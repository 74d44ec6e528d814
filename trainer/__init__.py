"""saeforge.trainer: baseline and Gated SAEs (arXiv 2404.16014), losses, the training loop and sweeps.

Sees stores only: never imports transformer_lens or datasets.
"""
