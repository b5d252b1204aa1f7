"""Helpers shared by the transformers end-to-end tests (test_hf_tiny.py, test_hf_smollm2.py): run
generate with transformers' default cache and with a VAttnCache on the same inputs, and compare."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import vattn.hf as vhf  # noqa: E402
from vattn.generation import cache_kwarg  # noqa: E402


def generate(model, enc, max_new_tokens, cache=None, *, sample=False, seed=0, logits=True, **kw):
    """generate() with a fixed number of new tokens; `cache=None` means transformers' default cache."""
    args = dict(
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=sample,
        return_dict_in_generate=True,
        output_logits=logits,
        **kw,
    )
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
    return vhf.formats.token_bytes(cache.num_layers, cache.num_kv_heads, cache.head_dim, cache.dtype)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: these models are too small to gain from more, and on a shared machine extra
    OpenMP threads spinning against other processes make generate 10-30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def teacher_forced_logits(model, enc, sequences, cache):
    """Next-token logits of every generated position of `sequences`, fed through `cache` one token at a
    time (prefill of the prompt, then decode steps on the reference tokens). A single flipped greedy
    token then cannot derail the rest of the comparison. Returns [steps, batch, vocab]."""
    kw = {cache_kwarg(model): cache, "use_cache": True}
    mask = enc["attention_mask"]
    width = enc["input_ids"].shape[1]
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    steps = []
    with torch.inference_mode():
        out = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=pos, **kw)
        steps.append(out.logits[:, -1].float())
        for t in range(width, sequences.shape[1] - 1):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=sequences[:, t : t + 1], attention_mask=mask, position_ids=pos, **kw)
            steps.append(out.logits[:, -1].float())
    return torch.stack(steps)


def prefill(model, enc, cache):
    """One forward of the (left-padded) prompt into `cache`, at the positions generate() gives them."""
    vhf.enable(model)  # a reference generate() switched the model back to sdpa
    with torch.inference_mode():
        mask = enc["attention_mask"]
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        model(**enc, position_ids=pos, **{cache_kwarg(model): cache}, use_cache=True)
    return cache


def extend(enc, extra):
    """enc with the token ids `extra` [batch, n] appended (all real)."""
    ids = torch.cat([enc["input_ids"], extra], 1)
    mask = torch.cat([enc["attention_mask"], torch.ones_like(extra)], 1)
    return {"input_ids": ids, "attention_mask": mask}
