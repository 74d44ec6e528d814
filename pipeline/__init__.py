"""saeforge.pipeline: everything that runs the LM: model loading, token data, harvest, evaluation, the CLI."""
