"""saeforge.pipeline: everything that runs the LM: model loading, text, harvest, evaluation, the CLI.

Text, in import order (each module imports only those before it):
``data`` (dataset specs and their documents) <- ``tokenization`` (token stream, token cache) <- ``windows``
(packing into windows, the held-out split) <- ``provenance`` (what a store records about its text and LM,
typed). Harvest: ``lm`` (the only module importing transformer_lens), ``batches`` (windows grouped per
forward pass, with the rows they contribute), ``sink`` (the hand-off to the store writer), ``harvest``.
Evaluation: ``splice`` (the splicing engine), ``metrics``, ``bootstrap``, ``eval_files`` (eval.json and the
ablation cache), ``evaluate`` (``evaluate_runs``, ``EvalConfig``). Errors: ``errors`` (``PipelineError``).

Words: a *window* is ``context_size`` token ids of the packed stream; a *row* is the activation at one kept
position of one window (one row of the store). ``HarvestConfig.tokens`` counts rows to store per hook,
``EvalConfig.tokens`` held-out token positions to evaluate on.

Shape suffixes where layouts change: ``B`` batch (windows per forward pass), ``P`` pos, ``D`` d (the hook's
width), ``N`` rows (flattened batch·pos, or the kept subset of it), ``V`` d_vocab, ``W`` every held-out window
of an evaluation, ``K`` windows of one block of the stream. E.g. ``acts_BPD.flatten(0, 1)`` is ``acts_ND``.
"""
