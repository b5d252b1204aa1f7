"""One attention layer inside vLLM: vattn's backend vs vLLM's CPU backend, per call (issue 14).

The same builder / impl objects vLLM uses (tests/test_vllm_backend.py builds them the same way) on a
real KV cache tensor with SmolLM2's heads (9 q / 3 kv, head_dim 64), block_size 128: the time of
do_kv_cache_update and of forward for a few batch shapes, best of 7 rounds of 50 calls each, both
backends alternating in one run. Shows what end-to-end tokens/s (bench/vllm_bench.py) hides: the
attention part alone, vattn's kernels plus its Python checks against vLLM's C++ ops.

Run in the vLLM venv:  bench/.venv-vllm/bin/python bench/vllm_layer_bench.py [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch

SHAPES = {  # name: rows of (cached tokens, new tokens)
    "decode b=4 ctx=100": [(100, 1)] * 4,
    "decode b=16 ctx=100": [(100, 1)] * 16,
    "decode b=16 ctx=1000": [(1000, 1)] * 16,
    "prefill 2 x 300": [(0, 300)] * 2,
    "mixed 8 decodes ctx=500 + chunk 64 on 200": [(500, 1)] * 8 + [(200, 64)],
}


def _best(f, n=50, rounds=7) -> float:
    f()
    best = math.inf
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)

    from transformers import LlamaConfig
    from vllm.config import CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vattn.vllm.backend import VattnAttentionBackend

    hq, hk, d, bs = 9, 3, 64, 128
    cfg_dir = tempfile.mkdtemp(prefix="vattn-layer-bench-")
    LlamaConfig(hidden_size=576, num_attention_heads=hq, num_key_value_heads=hk, head_dim=d, vocab_size=256, max_position_embeddings=4096).save_pretrained(cfg_dir)  # fmt: skip
    cc = CacheConfig(block_size=bs)
    vc = VllmConfig(model_config=ModelConfig(model=cfg_dir, dtype=dtype, max_model_len=4096, skip_tokenizer_init=True), cache_config=cc)  # fmt: skip
    spec = FullAttentionSpec(block_size=bs, num_kv_heads=hk, head_size=d, dtype=dtype)
    layers = {}
    with set_current_vllm_config(vc):
        for name, backend in (("cpu", CPUAttentionBackend), ("vattn", VattnAttentionBackend)):
            layer = Attention(hq, d, d**-0.5, hk, cache_config=cc, prefix=f"{name}.attn", attn_backend=backend)
            layers[name] = (layer, backend.get_builder_cls()(spec, [f"{name}.attn"], vc, torch.device("cpu")))

    print(f"{args.dtype}, SmolLM2 heads (9 q / 3 kv x 64), block_size {bs}, torch threads {torch.get_num_threads()}")
    print("\n| shape | CPU_ATTN update | vattn update | CPU_ATTN forward | vattn forward | forward vattn / CPU_ATTN |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for shape, rows in SHAPES.items():
        seq = [c + n for c, n in rows]
        per_row = max(math.ceil(s / bs) for s in seq)
        num_blocks = len(rows) * per_row + 4
        table = torch.randperm(num_blocks, generator=g)[: len(rows) * per_row].view(len(rows), per_row).int()
        nq = sum(n for _, n in rows)
        qsl = torch.tensor([0] + torch.cumsum(torch.tensor([n for _, n in rows]), 0).tolist(), dtype=torch.int32)
        slots = torch.tensor(
            [int(table[r, p // bs]) * bs + p % bs for r, (c, n) in enumerate(rows) for p in range(c, c + n)]
        )
        common = CommonAttentionMetadata(
            query_start_loc=qsl,
            query_start_loc_cpu=qsl,
            seq_lens=torch.tensor(seq, dtype=torch.int32),
            num_reqs=len(rows),
            num_actual_tokens=nq,
            max_query_len=max(n for _, n in rows),
            max_seq_len=max(seq),
            block_table_tensor=table,
            slot_mapping=slots,
        )
        q = torch.randn(nq, hq, d, generator=g).to(dtype)
        k = torch.randn(nq, hk, d, generator=g).to(dtype)
        v = torch.randn(nq, hk, d, generator=g).to(dtype)
        res = {}
        for name, (layer, builder) in layers.items():
            kv = torch.randn(num_blocks, hk, bs, 2 * d, generator=g).to(dtype)
            out = torch.empty(nq, hq, d, dtype=dtype)
            with set_current_vllm_config(vc):
                md = builder.build(0, common)
                up = _best(lambda: layer.impl.do_kv_cache_update(layer, k, v, kv, slots))
                fw = _best(lambda: layer.impl.forward(layer, q, k, v, kv, md, out))
            res[name] = (up, fw)
        (cu, cf), (vu, vf) = res["cpu"], res["vattn"]
        print(f"| {shape} | {cu:.0f} us | {vu:.0f} us | {cf:.0f} us | {vf:.0f} us | {vf / cf:.2f} |", flush=True)


if __name__ == "__main__":
    main()
