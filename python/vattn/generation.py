"""Generation on a vattn cache, shared by the `vattn` command (cli.py) and bench/e2e_generate.py.

An internal module with a stable enough surface for the two of them (not exported by `vattn`):

    resolve_device(name) -> str          'auto' / 'cpu' / 'cuda[:N]' checked against torch and this build
    resolve_dtype(name, device)          'auto' is float32 on CPU, bfloat16 on CUDA
    cache_kwarg(model) -> str            generate's cache argument: `cache` or `past_key_values`
    encode_prompts(tokenizer, prompts, chat)   one left-padded batch, chat template if asked and present
    run_generation(model, tokenizer, prompts, ...) -> dict
                                         generate on a fresh vattn.hf.VAttnCache: texts, timing, memory

Problems the user can fix (an absent device, a prompt longer than the model's positions) raise
UserError, which the command line prints as one line with exit status `code`.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, Sequence

LAYOUTS = ("token_major", "layer_major", "head_major")
DTYPES = ("auto", "float32", "float16", "bfloat16")

DEMO_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about memory.",
    "In two sentences, explain why a key-value cache makes text generation with transformers faster.",
    "Name three prime numbers.",
)


class UserError(Exception):
    """A user-facing error: printed as one line by the command line, exit status `code`
    (2: bad usage, 1: anything else)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def log(msg: str) -> None:
    """One line on stderr (progress and notes; stdout holds only the results)."""
    print(msg, file=sys.stderr, flush=True)


def resolve_device(name: str) -> str:
    import torch

    import vattn

    cuda_ok = torch.cuda.is_available() and bool(vattn._C.built_with_cuda)
    if name == "auto":
        return "cuda" if cuda_ok else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {name!r} (use cpu, cuda, cuda:N or auto)", code=2) from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        raise UserError(f"device {name!r} is not supported by vattn (use cpu or cuda)", code=2)
    if not vattn._C.built_with_cuda:
        raise UserError(f"device {name!r} requested but this vattn build has no CUDA support")
    if not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but torch sees no CUDA device")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r} is not there ({torch.cuda.device_count()} CUDA device(s))")
    return str(dev)


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return getattr(torch, name)


class _Progress:
    """A transformers streamer that only counts generated tokens and shows progress on stderr."""

    def __init__(self, total: int, label: str = "generating"):
        self.total, self.label = total, label
        self.count = -1  # the first put() is the prompt
        self.tty = sys.stderr.isatty()
        self._last_shown = -1

    def put(self, value):
        self.count += 1
        if self.count <= 0:
            return
        step = max(1, self.total // 8)
        if self.tty:
            print(f"\r{self.label}: {self.count}/{self.total} tokens", end="", file=sys.stderr, flush=True)
        elif self.count == self.total or self.count - self._last_shown >= step:
            log(f"{self.label}: {self.count}/{self.total} tokens")
            self._last_shown = self.count

    def end(self):
        if self.tty:
            print(file=sys.stderr, flush=True)


def cache_kwarg(model) -> str:
    """Name of generate's cache argument: `cache` in transformers >= 5.2x, `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def encode_prompts(tokenizer, prompts: Sequence[str], chat: bool):
    texts = list(prompts)
    if chat and getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    return tokenizer(texts, return_tensors="pt", padding=True)


def run_generation(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    device: str,
    layout: str,
    max_new_tokens: int,
    max_seq_len: Optional[int] = None,
    max_physical_bytes: Optional[int] = None,
    page_bytes: Optional[int] = None,
    sample: bool = False,
    seed: int = 0,
    chat: bool = True,
    progress: bool = True,
    kv_format="auto",
    policy=None,
) -> dict:
    """Generates for all prompts in one left-padded batch on a VAttnCache; returns texts, timing, memory."""
    import torch

    from . import hf

    enc = encode_prompts(tokenizer, prompts, chat)
    enc = {k: v.to(device) for k, v in enc.items()}
    batch, prompt_width = enc["input_ids"].shape
    limit = "the cache's --max-seq-len of"
    if max_seq_len is None:
        max_seq_len = getattr(model.config, "max_position_embeddings", None) or prompt_width + max_new_tokens
        limit = "the model's"
    if prompt_width + max_new_tokens > max_seq_len:
        raise UserError(
            f"prompt ({prompt_width} tokens) + --max-new-tokens ({max_new_tokens}) exceed "
            f"{limit} {max_seq_len} positions",
            code=2,
        )
    cache = hf.VAttnCache.for_model(
        model,
        max_batch=batch,
        max_seq_len=max_seq_len,
        layout=layout,
        max_physical_bytes=max_physical_bytes,
        page_bytes=page_bytes,
        kv_format=kv_format,
        policy=policy,
    )
    streamer = _Progress(max_new_tokens) if progress else None
    # Eager decode: VAttnCache is compileable, so generate would compile the decode forward on CUDA
    # by default; the demo times and reports the cache as it is, not a compilation.
    gen_kwargs = dict(
        max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=sample, disable_compile=True
    )
    if sample:
        gen_kwargs.update(temperature=0.8, top_p=0.95)
        torch.manual_seed(seed)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is not None:
        gen_kwargs["pad_token_id"] = pad_id
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, **gen_kwargs, streamer=streamer, **{cache_kwarg(model): cache})
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    new = out[:, prompt_width:]
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in new.tolist()]
    stats = cache.stats()
    generated = new.shape[1]
    result = {
        "texts": texts,
        "batch": batch,
        "prompt_width": prompt_width,
        "generated": generated,
        "seconds": elapsed,
        "tokens_per_s": batch * generated / elapsed,
        "stats": stats,
        "static_max_bytes": cache.static_bytes(batch, max_seq_len),
        "static_this_bytes": cache.static_bytes(batch, prompt_width + generated),
        "max_seq_len": max_seq_len,
        "dtype": str(cache.dtype).replace("torch.", ""),
        "layout": layout,
        "real_prompt_tokens": int(enc["attention_mask"].sum()),
        "kv_format": kv_format if isinstance(kv_format, str) else ",".join(kv_format),
        "plain_used_bytes": stats["tokens"] * cache.static_bytes(1, 1),  # the same tokens, unquantized
        "policy": None if policy is None else repr(policy),
        "compressions": list(cache.compressions),
    }
    cache.release()
    return result
