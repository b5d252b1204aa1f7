"""VAttnCache under torch.compile (issue 13): a decode forward traced with fullgraph=True (no graph
break), consecutive compiled steps that keep mapping pages and commit like eager, logits equal to
the eager VAttnCache run and to transformers' DynamicCache, no recompilation per token, MemoryError
from a compiled step, and generate()'s own auto-compile path (is_compileable).

Each layer of a traced forward is one opaque op, torch.ops.vattn.hf_attend, whose implementation is
the eager VAttnCache code: the graph holds the model's math, the op does the cache's host bookkeeping.
Tiny random Llama, fp32 on CPU; backend "inductor" once (the slow one to compile), "aot_eager" (the
same tracing and functionalization, no code generation) for the rest."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

import torch._dynamo  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import vattn.hf as vhf  # noqa: E402
from vattn._models import tiny_llama  # noqa: E402

from hf_helpers import _one_thread, cache_kwarg, generate  # noqa: E402,F401

PROMPTS = ["Hi", "A longer prompt, so that the other rows are left padded.", "Virtual memory.", "x"]
STEPS = 6  # compiled decode steps after the eager prefill
LOGIT_TOL = 1e-4  # fp32: only the order of the sums differs (inductor fuses)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=0)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _cache(model, batch, **kw):
    kw.setdefault("max_seq_len", 256)
    kw.setdefault("page_bytes", 4096)  # a token of this model is 1.5 KiB: a new page every few steps
    if kw["page_bytes"] is None:  # the device's default
        del kw["page_bytes"]
    return vhf.VAttnCache.for_model(model, max_batch=batch, **kw)


def _decode(model, enc, cache, steps, compile_step=None, on_step=None):
    """Eager prefill of the left-padded prompt, then `steps` greedy one-token forwards, each through
    `compile_step(step_fn)` if given. cache None: transformers' default cache (DynamicCache) on sdpa.
    on_step(i) runs after the prefill (i = -1) and after each step. Returns (logits [steps + 1, batch,
    vocab], tokens [batch, steps + 1])."""
    if cache is None:
        vhf.disable(model)
        kw = {}
    else:
        vhf.enable(model)
        kw = {cache_kwarg(model): cache}
    mask = enc["attention_mask"]
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.inference_mode():
        out = model(**enc, position_ids=pos, use_cache=True, **kw)
        past = out.past_key_values
        if cache is not None:
            assert past is cache

        def step(ids, mask, pos):
            return model(
                input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kwarg(model): past}
            ).logits[:, -1]

        fn = compile_step(step) if compile_step is not None else step
        logits = [out.logits[:, -1]]
        if on_step is not None:
            on_step(-1)  # after the prefill
        for i in range(steps):
            ids = logits[-1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            pos = pos[:, -1:] + 1
            logits.append(fn(ids, mask, pos))
            if on_step is not None:
                on_step(i)
    logits = torch.stack(logits).float()
    return logits, logits.argmax(-1).T


def _compare(model, enc, backend, steps=STEPS, dynamic=None, **cache_kw):
    """Compiled decode vs eager VAttnCache (and vs DynamicCache, for the plain format); returns the
    frames compiled so far after each step."""
    batch = enc["input_ids"].shape[0]
    refs = [_decode(model, enc, _cache(model, batch, **cache_kw), steps)]
    if cache_kw.get("kv_format", "auto") == "auto":
        refs.append(_decode(model, enc, None, steps))

    counter = CompileCounterWithBackend(backend)
    cache = _cache(model, batch, **cache_kw)
    frames, pages = [], []  # after each compiled step; pages: after the prefill, then each step

    def on_step(i):
        if i >= 0:
            frames.append(counter.frame_count)
        pages.append(cache.stats()["pages_mapped"])

    got_logits, got_tokens = _decode(
        model,
        enc,
        cache,
        steps,
        lambda fn: torch.compile(fn, fullgraph=True, backend=counter, dynamic=dynamic),
        on_step,
    )
    diffs = [(got_logits - ref_logits).abs().max().item() for ref_logits, _ in refs]
    print(
        f"compiled ({backend}, batch={batch}, {cache_kw}): max |logits diff| vs eager VAttnCache "
        f"{diffs[0]:.3g}{f', vs DynamicCache {diffs[1]:.3g}' if len(diffs) > 1 else ''}; frames compiled "
        f"after each step {frames}; pages mapped {pages}"
    )
    assert max(diffs) < LOGIT_TOL
    assert all(torch.equal(got_tokens, ref_tokens) for _, ref_tokens in refs)
    # Every compiled step committed its token like an eager one, and pages were mapped as rows grew.
    width = enc["input_ids"].shape[1]
    assert cache.get_seq_length() == width + steps
    lengths = enc["attention_mask"].sum(1).tolist()
    assert cache._lengths == [n + steps for n in lengths]
    assert pages[-1] > pages[0]
    return frames


def test_compiled_decode_inductor_ragged_batch(tiny):
    """inductor, fullgraph, left-padded batch of 4: logits within fp32 tolerance of eager and of
    DynamicCache, identical greedy tokens, pages mapped as the rows grow. Default dynamic=None: the
    first graph is specialized on the mask width and column count, the second step recompiles once
    with them symbolic (automatic dynamic), and no later step recompiles."""
    model, tok = tiny
    frames = _compare(model, tok(PROMPTS), "inductor")
    assert frames[0] >= 1
    assert frames[-1] == frames[1]


@pytest.mark.parametrize(
    "batch, layout, kv_format", [(1, "token_major", "auto"), (4, "layer_major", "auto"), (4, "token_major", "int8")]
)
def test_compiled_decode_aot_eager(tiny, batch, layout, kv_format):
    """aot_eager (functionalized graph, no codegen): same results as eager on both layouts and a
    quantized format; with dynamic=True the graph of the first step serves every later step."""
    model, tok = tiny
    enc = tok(PROMPTS[:batch] if batch > 1 else PROMPTS[1:2])
    frames = _compare(model, enc, "aot_eager", dynamic=True, layout=layout, kv_format=kv_format)
    assert frames[0] >= 1
    assert frames[-1] == frames[0]


def test_compiled_step_graph_has_one_op_per_layer(tiny):
    """What the compiler sees of the cache: one torch.ops.vattn.hf_attend per layer, nothing else of
    vattn (no host bookkeeping inlined, no vattn.KVCache view as a graph input)."""
    model, tok = tiny
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    cache = _cache(model, 2)
    _decode(model, tok(PROMPTS[:2]), cache, 1, lambda fn: torch.compile(fn, fullgraph=True, backend=backend))
    (gm,) = graphs
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert sum("vattn" in t for t in targets) == model.config.num_hidden_layers
    assert all("hf_attend" in t for t in targets if "vattn" in t)
    view_shape = tuple(cache.kv.kv(0)[0].shape)  # [max_batch, max_seq_len, kv_heads, head_dim]
    inputs = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
    assert any(isinstance(v, torch.Tensor) for v in inputs)
    assert not any(isinstance(v, torch.Tensor) and tuple(v.shape) == view_shape for v in inputs)


def test_compiled_step_raises_memory_error_and_keeps_the_cache(tiny):
    """A compiled step that needs a page the pool cannot give raises the cache's MemoryError (the
    eager message), and the cache is exactly as before it: no token committed, the step not left
    open. Another compiled step then works once memory is there again (here: the cache is reset and
    refilled)."""
    model, tok = tiny
    enc = tok(PROMPTS[1:2])
    width = enc["input_ids"].shape[1]
    page = 4096
    cfg = model.config
    token = vhf.formats.token_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, torch.float32)
    pages_for = lambda n: -(-n * token // page)  # noqa: E731
    limit = pages_for(width + 2) * page  # room for the prompt and a few more tokens (2 to 4), fewer than STEPS
    cache = _cache(model, 1, page_bytes=page, max_physical_bytes=limit)
    counter = CompileCounterWithBackend("aot_eager")
    seen = []
    with pytest.raises(MemoryError, match="max_physical_bytes"):
        _decode(
            model,
            enc,
            cache,
            STEPS,
            lambda fn: torch.compile(fn, fullgraph=True, backend=counter),
            lambda i: seen.append(cache.get_seq_length()) if i >= 0 else None,
        )
    assert counter.frame_count >= 1  # the failing step ran compiled
    done = len(seen)
    assert 0 < done < STEPS
    assert cache.get_seq_length() == width + done and cache._lengths == [width + done]
    assert cache._forward is None and not cache.kv._open_steps
    assert cache.stats()["used_bytes"] == (width + done) * token
    cache.reset()
    logits, _ = _decode(model, enc, cache, 1, lambda fn: torch.compile(fn, fullgraph=True, backend=counter))
    assert cache.get_seq_length() == width + 1


def test_generate_auto_compile(tiny):
    """generate() compiles the decode forward itself for a cache with is_compileable (on CPU only when
    compile_config._compile_all_devices is set; on CUDA by default): same tokens and logits as eager
    VAttnCache and DynamicCache, and a second generate on a new cache reuses the compiled graph."""
    from transformers import CompileConfig

    model, tok = tiny
    enc = tok(PROMPTS)
    cache = _cache(model, 4)
    assert cache.is_compileable
    config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)  # (generate deep-copies it)
    config._compile_all_devices = True
    graphs = lambda: counters["stats"]["unique_graphs"]  # noqa: E731
    before = graphs()
    vhf.enable(model)
    gen_config = copy.deepcopy(model.generation_config)
    assert not model._valid_auto_compile_criteria({"cache": cache}, gen_config)  # CPU: not by default
    gen_config.compile_config = config
    assert model._valid_auto_compile_criteria({"cache": cache}, gen_config)
    try:
        ref = generate(model, enc, 12)
        vhf.enable(model)
        eager = generate(model, enc, 12, _cache(model, 4))
        assert graphs() == before
        got = generate(model, enc, 12, cache, compile_config=config)
        compiled = graphs() - before
        assert 1 <= compiled <= 2  # the decode forward; once more when the column count turns symbolic
        again = generate(model, enc, 12, _cache(model, 4), compile_config=config)
        assert graphs() - before == compiled  # a new cache of the same shape: no recompilation
    finally:
        model.__dict__.pop("_compiled_call", None)
        model.__dict__.pop("_last_compile_config", None)
    for out in (got, again):
        assert torch.equal(out.sequences, eager.sequences) and torch.equal(out.sequences, ref.sequences)
        assert max((a - b).abs().max().item() for a, b in zip(out.logits, eager.logits)) < LOGIT_TOL
    assert cache.get_seq_length() == got.sequences.shape[1] - 1


def test_generate_auto_compile_with_decode_eviction(tiny):
    """An eviction policy that also runs during decode (H2O every 3 steps: decode attention emits the
    scores it reads, compaction drops tokens mid-generation) works the same in compiled steps: the
    same tokens, compressions and stored lengths as eager generate."""
    from transformers import CompileConfig

    from vattn import policies

    model, tok = tiny
    enc = tok(PROMPTS[1:3])
    config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    config._compile_all_devices = True
    runs = []
    try:
        for compile_config in (None, config):
            cache = _cache(model, 2, policy=policies.H2O(keep=0.5, recent=2, every=3))
            extra = {} if compile_config is None else {"compile_config": compile_config}
            before = counters["stats"]["unique_graphs"]
            out = generate(model, enc, 12, cache, logits=False, **extra)
            compiled = counters["stats"]["unique_graphs"] - before
            assert (compiled > 0) == (compile_config is not None)
            runs.append((out.sequences, [cache.kv.length(s) for s in cache._slots], len(cache.compressions)))
    finally:
        model.__dict__.pop("_compiled_call", None)
        model.__dict__.pop("_last_compile_config", None)
    (eager_seq, eager_len, eager_comp), (seq, lengths, comp) = runs
    assert torch.equal(seq, eager_seq)
    assert lengths == eager_len and comp == eager_comp > 0
    assert all(n < m for n, m in zip(lengths, (enc["attention_mask"].sum(1) + 11).tolist()))  # tokens were evicted


@pytest.mark.gpu
def test_generate_auto_compile_cuda():
    """CUDA: generate() compiles the decode forward by itself for a compileable cache (transformers'
    default CompileConfig: inductor, mode reduce-overhead, i.e. CUDA graphs). hf_attend is tagged
    cudagraph_unsafe, so it stays out of the CUDA graphs and every compiled step still maps pages
    and commits its token: the tokens agree with the eager VAttnCache run (bf16: inductor's fusions
    may round differently, so most tokens, not all), and the rows hold what they should."""
    model, tok = tiny_llama(seed=0, dtype=torch.bfloat16, device="cuda")
    enc = {k: v.cuda() for k, v in tok(PROMPTS).items()}
    new = 32
    eager = generate(model, enc, new, _cache(model, 4, page_bytes=None), disable_compile=True, logits=False)
    assert not hasattr(model, "_compiled_call")
    cache = _cache(model, 4, page_bytes=None)
    vhf.enable(model)
    out = generate(model, enc, new, cache, logits=False)
    assert hasattr(model, "_compiled_call")  # generate took its auto-compile path
    assert (out.sequences == eager.sequences).float().mean().item() > 0.9
    assert cache.get_seq_length() == out.sequences.shape[1] - 1
    assert cache._lengths == (enc["attention_mask"].sum(1) + new - 1).tolist()
