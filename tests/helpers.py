"""Shared test builders: an offline tokenizer, tiny models of every family, sample text.

Everything here is built from configs in milliseconds and is deterministic, so tests never
touch the Hugging Face Hub. Import it as ``from helpers import tiny_model`` (pytest puts
``tests/`` on the path).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "phi3", "gemma")
TOKENIZER_VOCAB = 384  # 256 byte symbols + 126 merges + 2 specials: small and fast

_SAMPLE_TEXT = """\
The river town woke before the sun. Bakers lit their ovens, and the smell of bread drifted
over the water while the ferry waited at the dock. Nobody was in a hurry yet; the morning
belonged to the birds and to the old man who swept the square every day of the year.

A good map is a kind of promise. It tells you that the road you cannot see still exists,
that the bridge will be there when you arrive, and that someone walked this way before you
and thought it worth writing down. Maps are wrong in small ways and right in large ones.

In the library on the hill, the students argued about numbers. One of them said that every
measurement carries its own doubt, and that a careful person writes the doubt next to the
number. Another said that doubt is only useful when it changes what you do next. They were
both right, and the librarian told them to be quiet.

The engine of the little train was painted green. It climbed the valley slowly, stopping at
every village, and the driver knew the names of the children who waited at each station.
When snow fell in winter, the train still ran, though it was often late, and the villagers
forgave it because it had never once failed to arrive.

Learning a language is mostly patience. You repeat the same words until they stop feeling
strange, then you make mistakes in public, and then one evening you realise that you have
understood a joke without translating it. That evening is worth all the mornings before it.

The market opened at nine. There were apples from the northern farms, cheese wrapped in
cloth, fish packed in ice, and a stall that sold nothing but buttons. The button seller
claimed to have a button from every country in the world, and nobody had ever proved him
wrong, although many had tried over cups of strong coffee.

Good tools are quiet. A sharp knife, a steady ladder, a clear set of instructions: each of
them does its work without asking for attention, and you only notice them when they are
missing. The best compliment a tool can receive is that nobody remembers using it.

At the edge of the forest there was a small house with a blue door. The woman who lived
there kept bees, and in the summer she sold honey in glass jars with handwritten labels.
She said the bees taught her to work steadily, to share the harvest, and to leave the
flowers better than she found them.

The storm arrived in the afternoon. First the wind turned the leaves over, showing their
pale undersides, then the sky darkened and the first heavy drops struck the dust. Within
minutes the street was a river, and the children ran out to float paper boats along it.

Every long project begins with a short list. Write down what you know, what you do not
know, and what you will do first. Then do the first thing, cross it out, and look at the
list again. Most of the work is in the looking, and most of the looking is honest counting.
"""


def sample_text() -> str:
    """A few KB of plain English, enough to calibrate a tiny model."""
    return _SAMPLE_TEXT


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_SAMPLE_TEXT], trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained offline on :func:`sample_text`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        model_max_length=256,
    )


def _config(family: str, vocab: int, overrides: dict[str, Any]):
    import transformers

    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    decoder = {
        "vocab_size": vocab,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # grouped-query attention
        "max_position_embeddings": 256,
        **ids,
        **overrides,
    }
    builders = {
        "llama": lambda: transformers.LlamaConfig(**decoder),
        "mistral": lambda: transformers.MistralConfig(**decoder),
        "qwen2": lambda: transformers.Qwen2Config(**decoder),
        "phi3": lambda: transformers.Phi3Config(**decoder),
        "gemma": lambda: transformers.GemmaConfig(**decoder, head_dim=8),
        "gpt2": lambda: transformers.GPT2Config(
            **{"vocab_size": vocab, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256, **ids, **overrides}
        ),
    }
    if family not in builders:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    return builders[family]()


def tiny_model(family: str = "llama", *, seed: int = 0, **overrides: Any):
    """A randomly initialised tiny causal LM of ``family`` (eager attention, fp32, eval mode).

    Args:
        family: one of :data:`FAMILIES`.
        seed: weight initialisation seed; the global RNG is left untouched.
        **overrides: config arguments to change, e.g. ``num_hidden_layers=3`` (GPT-2 maps it
            to ``n_layer``).
    """
    from transformers import AutoModelForCausalLM

    config = _config(family, len(tiny_tokenizer()), overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def save_tiny_model(family: str, path: str | Path, **overrides: Any) -> Path:
    """Save a tiny model of ``family`` and the tiny tokenizer as a safetensors checkpoint folder."""
    path = Path(path)
    tiny_model(family, **overrides).save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path


def shrink_mlp(model, block: int, keep: int) -> None:
    """Keep the first ``keep`` MLP channels of a Llama-layout block (heterogeneous widths)."""
    from cwca_export.compression.width import narrow_linear

    mlp = model.model.layers[block].mlp
    index = torch.arange(keep)
    narrow_linear(mlp.gate_proj, "out", index)
    narrow_linear(mlp.up_proj, "out", index)
    narrow_linear(mlp.down_proj, "in", index)


def factorise(model, path: str, rank: int) -> None:
    """Replace the Linear (or Conv1D) at ``path`` by two Linears of rank ``rank`` (truncated SVD)."""
    from cwca_export.blocks import weight_out_in
    from cwca_export.compression.lowrank import factorised_linear, svd_factors

    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    old = getattr(parent, name)
    with torch.no_grad():
        a, b = svd_factors(weight_out_in(old), rank)
        setattr(parent, name, factorised_linear(old, a, b))


def load_benchmark(name: str):
    """The module ``benchmarks/<name>.py`` (benchmarks are scripts, not an installed package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ort_logit_error(model, onnx_path, *, length: int, pad: int, seed: int) -> float:
    """Relative RMS error of ONNX Runtime's logits for ``onnx_path`` against ``model``'s torch
    forward, over the unpadded positions of a left-padded sample batch."""
    import numpy as np

    from cwca_export.exporter.session import DecoderSession, make_session, position_ids
    from cwca_export.exporter.verify import sample_inputs

    ids, mask = sample_inputs(model.config.vocab_size, length=length, pad=pad, seed=seed)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(position_ids(mask)), use_cache=False).logits.numpy()
    got, _ = DecoderSession(make_session(onnx_path)).run(ids, mask)
    valid = mask.astype(bool)
    return float(np.sqrt(np.mean((got[valid] - ref[valid]) ** 2)) / np.sqrt(np.mean(ref[valid] ** 2)))
