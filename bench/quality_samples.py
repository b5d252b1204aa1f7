"""The samples and scores of the KV-eviction quality comparison (issue 10), shared by both sides.

bench/kvpress_quality.py (NVIDIA kvpress, in its own venv: bench/kvpress_env.sh) and the vattn side
import this module, so both score exactly the same tokens the same way. It imports neither vattn nor
kvpress, only torch (and transformers through the tokenizer handed to it).

Sample spec (SPEC below):
- Text: ../shared/data/tinyshakespeare.txt (relative to the project root), read as UTF-8.
- Tokenization: the whole text at once with the model's tokenizer, `add_special_tokens=False`: no BOS,
  no EOS. SmolLM2's tokenizer adds none by default either (add_bos_token is False), so this is also
  what a plain `tok(text)` gives; `tokenize` records both facts in the spec it returns.
- N samples (default 8) of CONTEXT + CONTINUATION = 1000 + 128 consecutive tokens of that one token
  stream, at the offsets `sample_offsets(n_tokens, n)`: evenly spaced from the first token to the last
  possible start, floor(i * (n_tokens - 1128) / (n - 1)) for i in 0..n-1 (0 alone for n = 1).
- `ids_sha256` of the concatenated sample ids lets the two sides (different transformers versions)
  check that they tokenized identically.

Scoring (`score`): the 128 continuation tokens t[1000..1127] are predicted by 128 logit rows: the
prefill's last row (position 999, which predicts t[1000]) and the rows of a teacher-forced pass over
t[1000..1126] at positions 1000..1126 through the (compressed) cache. A press compresses the cache at
the end of the prefill, after the prefill's own attention, so the first of the 128 predictions is the
same for every press: it is scored all the same (128 tokens, as the issue fixes). Reported per sample:
the mean NLL (nats) over the 128 tokens, and the 128 top-1 (argmax) predictions; `agreement` is the
fraction of positions whose top-1 equals the full cache's.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import torch

CONTEXT = 1000
CONTINUATION = 128
SPAN = CONTEXT + CONTINUATION
DEFAULT_SAMPLES = 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEXT_REL = os.path.join("..", "shared", "data", "tinyshakespeare.txt")
DEFAULT_TEXT = os.path.normpath(os.path.join(ROOT, DEFAULT_TEXT_REL))


def tokenize(tokenizer, text: str) -> tuple[list[int], dict]:
    """(token ids of the whole text without special tokens, facts about the tokenization)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    probe = "To be, or not to be"
    plain = list(tokenizer(probe)["input_ids"])
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    facts = {
        "add_special_tokens": False,
        "tokenizer_adds_special_tokens_by_default": plain != bare,
        "bos_token": getattr(tokenizer, "bos_token", None),
        "n_text_tokens": len(ids),
    }
    return ids, facts


def sample_offsets(n_tokens: int, n: int, span: int = SPAN) -> list[int]:
    """n deterministic, evenly spaced start offsets of span-token windows in n_tokens tokens."""
    if n < 1:
        raise ValueError("need at least one sample")
    last = n_tokens - span
    if last < 0:
        raise ValueError(f"text has {n_tokens} tokens, fewer than one sample of {span}")
    if n == 1:
        return [0]
    return [i * last // (n - 1) for i in range(n)]


def make_samples(tokenizer, text: str, n: int = DEFAULT_SAMPLES) -> tuple[list[dict], dict]:
    """([{"index", "offset", "context": [1000 ids], "continuation": [128 ids]}], spec)."""
    ids, facts = tokenize(tokenizer, text)
    offsets = sample_offsets(len(ids), n)
    samples = []
    digest = hashlib.sha256()
    for i, off in enumerate(offsets):
        window = ids[off : off + SPAN]
        digest.update(",".join(map(str, window)).encode() + b";")
        samples.append({"index": i, "offset": off, "context": window[:CONTEXT], "continuation": window[CONTEXT:]})
    spec = {
        "context_tokens": CONTEXT,
        "continuation_tokens": CONTINUATION,
        "samples": n,
        "offsets": offsets,
        "offset_rule": "floor(i * (n_text_tokens - 1128) / (samples - 1)), i = 0..samples-1",
        "ids_sha256": digest.hexdigest(),
        "scored": "the 128 continuation tokens; the first is predicted by the prefill's last logits",
        "continuation_positions": [CONTEXT, SPAN - 2],
        **facts,
    }
    return samples, spec


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def score(first_logits: torch.Tensor, cont_logits: torch.Tensor, continuation: Sequence[int]) -> dict:
    """Mean NLL and top-1 predictions of the 128 continuation tokens.

    first_logits: [vocab], the prefill's last row (predicts continuation[0]);
    cont_logits: [127, vocab], the teacher-forced rows over continuation[:-1] (predict continuation[1:]).
    """
    logits = torch.cat([first_logits.reshape(1, -1), cont_logits.reshape(-1, first_logits.shape[-1])], 0)
    target = torch.as_tensor(list(continuation), dtype=torch.long)
    if logits.shape[0] != target.numel():
        raise ValueError(f"{logits.shape[0]} logit rows for {target.numel()} tokens")
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = -logp.gather(1, target[:, None])[:, 0]
    return {"nll": nll.mean().item(), "top1": logits.argmax(-1).tolist()}


def agreement(top1: Sequence[int], reference: Sequence[int]) -> float:
    """Fraction of positions where the top-1 prediction equals the reference's."""
    if len(top1) != len(reference):
        raise ValueError("prediction lists of different lengths")
    return sum(int(a == b) for a, b in zip(top1, reference)) / len(reference)


def full_forward_score(model, sample: dict) -> dict:
    """The same score from one forward pass over all 1128 tokens (no cache): the reference of --check."""
    ids = torch.tensor([sample["context"] + sample["continuation"]])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0]
    return score(logits[CONTEXT - 1], logits[CONTEXT : SPAN - 1], sample["continuation"])
