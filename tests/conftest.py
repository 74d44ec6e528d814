"""Shared fixtures: a tiny Llama built from a config, with a real tokenizer saved to disk.

No downloads: the tokenizer is a byte-level BPE trained here on a few lines of Shakespeare and
saved to a temporary directory, so TransformerBridge never calls the hub.
"""
from __future__ import annotations

import pytest

TINY_TEXT = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "And by opposing end them. To die: to sleep;",
]


def build_tiny_tokenizer(directory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(TINY_TEXT * 20, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.save_pretrained(str(directory))
    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def build_tiny_llama(directory, *, n_layers=3, d_model=64, seed=0):
    """A random-weight LlamaForCausalLM (fp32, eval mode) and its tokenizer, both saved under ``directory``.

    Saved with ``save_pretrained`` so the same model can also be loaded by path (``--model DIR``).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer(directory)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=d_model, intermediate_size=2 * d_model,
        num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(str(directory))
    model.config.name_or_path = str(directory)
    return model, tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Path of a directory holding a tiny Llama (3 layers, d_model 64) and its tokenizer."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    build_tiny_llama(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_bridge(tiny_model_dir):
    """The tiny Llama wrapped by TransformerLens's TransformerBridge (3.0 to 4.x, whichever is installed; fp32, cpu)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    return TransformerBridge.boot_transformers(str(tiny_model_dir), hf_model=model, tokenizer=tok)
