"""pipeline.provenance: the typed provenance writes the store's JSON with the same keys, order and values, and
reads it back; a store without text rules is a ProvenanceError, not a KeyError."""
import json

import pytest

from saeforge.pipeline.data import describe_dataset
from saeforge.pipeline.errors import PipelineError, ProvenanceError
from saeforge.pipeline.harvest import HarvestConfig, harvest_provenance
from saeforge.pipeline.lm import load_lm
from saeforge.pipeline.provenance import Provenance, TextProvenance

STORE_KEYS = ["model", "model_info", "lm_dtype", "hooks", "tokenizer", "dataset", "context_size", "prepend_bos",
              "heldout", "special_token_rule", "special_token_ids", "doc_separator", "bos_token_id", "tokens", "seed",
              "row_order", "saeforge_version"]
"""The keys of a store's provenance attribute, in the order stores written before the typed provenance hold them."""


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_lm(str(tiny_model_dir), device="cpu")


@pytest.fixture
def prov(lm, tmp_path, tiny_model_dir):
    (tmp_path / "a.txt").write_text("to be or not to be\n" * 20)
    cfg = HarvestConfig(out=str(tmp_path / "s"), model=str(tiny_model_dir), hooks=("blocks.0.hook_resid_post",),
                        dataset=str(tmp_path / "a.txt"), context_size=24, heldout_every=5, tokens=600, seed=3,
                        lm_dtype="float32")
    return harvest_provenance(cfg, lm, ["blocks.0.hook_resid_post"], describe_dataset(cfg.dataset))


def test_store_json_has_the_recorded_keys_in_order_and_values(prov, lm):
    d = prov.to_json()
    assert list(d) == STORE_KEYS
    tok = lm.tokenizer
    assert d["heldout"] == {"rule": "window_index % every == every - 1", "every": 5,
                            "unit": "window of the packed token stream"}
    assert (d["context_size"], d["prepend_bos"], d["special_token_rule"]) == (24, True, "exclude")
    assert d["special_token_ids"] == sorted({*tok.all_special_ids, tok.bos_token_id, tok.eos_token_id,
                                             tok.pad_token_id})
    assert (d["doc_separator"], d["bos_token_id"]) == (tok.eos_token_id, tok.bos_token_id)
    assert d["hooks"] == ["blocks.0.hook_resid_post"] and (d["tokens"], d["seed"], d["lm_dtype"]) == (600, 3, "float32")
    assert list(d["tokenizer"]) == ["class", "vocab_size", "bos_token_id", "eos_token_id", "name_or_path_of_model"]


def test_json_round_trip_is_exact(prov):
    text = json.dumps(prov.to_json())
    back = Provenance.from_json(json.loads(text))
    assert back == prov and json.dumps(back.to_json()) == text
    assert TextProvenance.from_json(json.loads(text)) == prov.text


def test_partial_provenance_reads_with_none_for_the_lm_and_harvest_keys(prov):
    d = {"model": "m", **prov.text.to_json()}
    back = Provenance.from_json(d)
    assert back.model == "m" and back.lm_dtype is None and back.hooks == () and back.text == prov.text


@pytest.mark.parametrize("d, match", [(None, "store s records no provenance"),
                                      ({"model": "m"}, "store s records no text rules.*KeyError: 'context_size'")])
def test_missing_text_rules_are_a_provenance_error(d, match):
    with pytest.raises(ProvenanceError, match=match) as info:
        Provenance.from_json(d, where="store s")
    assert isinstance(info.value, PipelineError) and not isinstance(info.value, (KeyError, ValueError))

