"""Helpers (no tests) shared by the transformers end-to-end tests: run generate with transformers' default cache and with
a VAttnCache on the same inputs, and compare."""
from __future__ import annotations

import inspect

import pytest
import torch

pytest.importorskip("transformers")

import vattn.hf as vhf  # noqa: E402


def cache_kwarg(model) -> str:
    """`cache` where the model's forward takes it (transformers >= 5.2x deprecates `past_key_values`)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def generate(model, enc, max_new_tokens, cache=None, *, sample=False, seed=0, logits=True, **kw):
    """generate() with a fixed number of new tokens; `cache=None` means transformers' default cache."""
    args = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=sample,
                return_dict_in_generate=True, output_logits=logits, **kw)
    if sample:
        args.update(temperature=1.0, top_k=0, top_p=1.0)
        torch.manual_seed(seed)
    if cache is not None:
        args[cache_kwarg(model)] = cache
    else:
        vhf.disable(model)  # the reference runs on transformers' own attention (sdpa)
    with torch.inference_mode():
        return model.generate(**enc, **args)


def max_logit_diff(ref, out, steps):
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(ref.logits[:steps], out.logits[:steps]))


def token_bytes(cache) -> int:
    """Bytes one stored token takes over all layers (K and V)."""
    elem = torch.empty((), dtype=cache.dtype).element_size()
    return cache.num_layers * 2 * cache.num_kv_heads * cache.head_dim * elem


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: these models are too small to gain from more, and on a shared machine extra
    OpenMP threads spinning against other processes make generate 10-30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
