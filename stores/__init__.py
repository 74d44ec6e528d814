"""saeforge.stores: the on-disk activation store (Zarr v3), its writer, reader, loader and verifier.

Dimension key used across saeforge: ``batch``, ``pos``, ``rows`` (flattened batch×pos),
``d_in``, ``d_sae``, ``d_vocab``.
"""
