"""A store's provenance, typed: where its rows came from, and the rules that regenerate its text.

Harvest builds a :class:`Provenance` and writes ``to_json()`` into the store's attributes (``provenance``);
evaluation reads it back once with :meth:`Provenance.from_json` and passes it on typed. The JSON is flat, in
this order (the order is part of the store's bytes, so ``to_json`` never changes it)::

    model, model_info, lm_dtype, hooks, tokenizer,                   # the LM
    dataset, context_size, prepend_bos, heldout, special_token_rule,  # the text: TextProvenance
    special_token_ids, doc_separator, bos_token_id,
    tokens, seed, row_order, saeforge_version                         # the harvest

:class:`TextProvenance` is the part evaluation needs: the dataset record (:func:`data.describe_dataset`),
the window rules (:class:`windows.WindowRules`) and the special-token rule that picks the stored positions.
With it and the tokenizer, :meth:`TextProvenance.heldout_windows` gives the held-out windows and
:meth:`TextProvenance.kept_positions` the positions a splice replaces.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import numpy as np

from saeforge.pipeline.data import dataset_identity
from saeforge.pipeline.errors import ProvenanceError
from saeforge.pipeline.windows import WindowRules, heldout_windows

SpecialTokenRule = Literal["exclude", "keep"]


def special_token_ids(tokenizer) -> tuple[int, ...]:
    """Ids the default rule excludes: the tokenizer's special tokens (BOS, EOS, pad, unk, ...), sorted."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None)
    return tuple(sorted(int(i) for i in ids))


def _dataset_label(record: dict) -> str:
    """A dataset record in a few words for a message: its spec and a digest of its content's identity."""
    digest = hashlib.sha256(json.dumps(dataset_identity(record)).encode()).hexdigest()[:12]
    return f"{record.get('spec')!r} (content {digest})"


@dataclass(frozen=True, kw_only=True)
class TextProvenance:
    """The text of a store: its source, how it was cut into windows, which positions were stored."""

    dataset: dict
    """The source's record (:func:`saeforge.pipeline.data.describe_dataset`): kind, files + sha256, or HF name."""

    rules: WindowRules
    """Context size, BOS, and the held-out rule."""

    special_token_rule: SpecialTokenRule = "exclude"
    """``exclude``: positions holding one of ``special_token_ids`` are not stored (nor spliced); ``keep``: all."""

    special_token_ids: tuple[int, ...] = ()
    """The tokenizer's special-token ids (BOS, EOS, pad, ...)."""

    doc_separator: int | None = None
    """Token id between documents in the stream (the tokenizer's EOS; None for pre-tokenised ids, used as stored)."""

    bos_token_id: int | None = None
    """The tokenizer's BOS id (the first id of every window when ``rules.prepend_bos``)."""

    @classmethod
    def build(cls, record: dict, tokenizer, rules: WindowRules,
              special_rule: SpecialTokenRule = "exclude") -> TextProvenance:
        """The text provenance of ``record`` cut by ``rules`` with ``tokenizer``."""
        separator = None if record.get("pretokenized") else tokenizer.eos_token_id  # ids as stored: none added
        return cls(dataset=record, rules=rules, special_token_rule=special_rule,
                   special_token_ids=special_token_ids(tokenizer), doc_separator=separator,
                   bos_token_id=tokenizer.bos_token_id)

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "context_size": self.rules.context_size,
                "prepend_bos": self.rules.prepend_bos, "heldout": self.rules.heldout_record(),
                "special_token_rule": self.special_token_rule, "special_token_ids": list(self.special_token_ids),
                "doc_separator": self.doc_separator, "bos_token_id": self.bos_token_id}

    @classmethod
    def from_json(cls, d: dict, where: str = "provenance") -> TextProvenance:
        """Read back what :meth:`to_json` wrote (ProvenanceError naming ``where`` and what is missing)."""
        if d.get("imported_from"):  # `saeforge store import-saelens`: activations without saeforge's text rules
            raise ProvenanceError(f"{where} was imported from a {d['imported_from']}: it has no held-out text, so "
                                  "its text cannot be regenerated (evaluate SAEs trained on it where their LM "
                                  "ran, or harvest a store with saeforge)")
        try:
            rules = WindowRules(context_size=int(d["context_size"]), prepend_bos=bool(d["prepend_bos"]),
                                heldout_every=int(d["heldout"]["every"]))
            return cls(dataset=d["dataset"], rules=rules, special_token_rule=d.get("special_token_rule", "exclude"),
                       special_token_ids=tuple(d.get("special_token_ids", ())), doc_separator=d.get("doc_separator"),
                       bos_token_id=d.get("bos_token_id"))
        except (KeyError, TypeError) as e:
            raise ProvenanceError(f"{where} records no text rules ({type(e).__name__}: {e}), so its held-out "
                                  "text cannot be regenerated") from None

    def differences(self, other: TextProvenance) -> list[str]:
        """What would make ``other`` give different held-out windows or kept positions, as "field: mine vs
        other's" (the same text read from files that moved is no difference)."""
        mine, theirs = self._identity(), other._identity()
        shown = {k: (repr(mine[k]), repr(theirs[k])) for k in mine if mine[k] != theirs[k]}
        if "dataset" in shown:  # a list of sha256s: named by its spec and a digest instead
            shown["dataset"] = (_dataset_label(self.dataset), _dataset_label(other.dataset))
        return [f"{k}: {a} vs {b}" for k, (a, b) in shown.items()]

    def _identity(self) -> dict[str, Any]:
        return {"dataset": dataset_identity(self.dataset), "context_size": self.rules.context_size,
                "prepend_bos": self.rules.prepend_bos, "heldout_every": self.rules.heldout_every,
                "special_token_rule": self.special_token_rule, "special_token_ids": list(self.special_token_ids),
                "doc_separator": self.doc_separator, "bos_token_id": self.bos_token_id}

    def heldout_windows(self, tokenizer) -> Iterator[np.ndarray]:
        """The held-out windows, int64 (context_size,), regenerated from the source with ``tokenizer``."""
        return heldout_windows(self.dataset, tokenizer, self.rules)

    def kept_positions(self, token_ids_BP):
        """BoolTensor (batch, pos): the positions whose activations the store keeps (every position when the
        rule is ``keep``; else every position not holding a special-token id)."""
        import torch

        token_ids_BP = torch.as_tensor(token_ids_BP)
        if self.special_token_rule == "keep":
            return torch.ones_like(token_ids_BP, dtype=torch.bool)
        special = torch.as_tensor(self.special_token_ids, dtype=token_ids_BP.dtype, device=token_ids_BP.device)
        return ~torch.isin(token_ids_BP, special)


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """Everything a store records about where its rows came from (the store attribute ``provenance``)."""

    model: str | None = None
    """The model spec the LM was loaded from (``load_lm``)."""

    model_info: dict = field(default_factory=dict)
    """``LoadedLM.info``: source, hf_name, sha256 or revision, n_layers, d_model, n_ctx, vocabulary."""

    lm_dtype: str | None = None
    """The LM's compute dtype during harvest (None: not recorded)."""

    hooks: tuple[str, ...] = ()
    """Hook names, in the order harvest resolved them."""

    tokenizer: dict | None = None
    """Tokenizer class, vocabulary size, BOS/EOS ids and the model it belongs to."""

    text: TextProvenance
    """The text and its rules."""

    tokens: int | None = None
    """Rows per hook the harvest was asked for (``HarvestConfig.tokens``)."""

    seed: int | None = None
    """Seed of the store's shuffle."""

    row_order: str | None = None
    """Order of rows in the stream before the shuffle."""

    saeforge_version: str | None = None
    """The saeforge version that wrote the store."""

    def to_json(self) -> dict[str, Any]:
        """The JSON-able dict written into the store, keys in the order of the module docstring."""
        return {"model": self.model, "model_info": self.model_info, "lm_dtype": self.lm_dtype,
                "hooks": list(self.hooks), "tokenizer": self.tokenizer, **self.text.to_json(),
                "tokens": self.tokens, "seed": self.seed, "row_order": self.row_order,
                "saeforge_version": self.saeforge_version}

    @classmethod
    def from_json(cls, d: dict | None, where: str = "provenance") -> Provenance:
        """Read a store's ``provenance`` attribute; the LM and harvest keys may be absent (None), the text
        keys may not (ProvenanceError naming ``where``)."""
        if not d:
            raise ProvenanceError(f"{where} records no provenance, so its held-out text cannot be regenerated")
        return cls(model=d.get("model"), model_info=d.get("model_info") or {}, lm_dtype=d.get("lm_dtype"),
                   hooks=tuple(d.get("hooks", ())), tokenizer=d.get("tokenizer"),
                   text=TextProvenance.from_json(d, where),
                   tokens=d.get("tokens"), seed=d.get("seed"), row_order=d.get("row_order"),
                   saeforge_version=d.get("saeforge_version"))
