# Tile constants of the CUDA kernels, read from the sources themselves, for the numpy
# emulations (tools/emulate_decode_split.py, tools/emulate_prefill_fa2.py): they take their
# geometry from here, so a constant changed in a header changes the emulation with it.
# Only `constexpr int NAME = <expression of integer literals and other such names>;` is read.
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_INC = "cuda/include/vattn/cuda"


def _scope(rel, struct):
    text = (ROOT / rel).read_text()
    if struct is None:
        return text
    m = re.search(r"\bstruct\s+%s\s*\{" % re.escape(struct), text)
    if m is None:
        raise KeyError(f"struct {struct} not found in {rel}")
    depth, i = 0, m.end() - 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i : j + 1]
    raise ValueError(f"unbalanced braces in struct {struct} of {rel}")


def constant(rel, name, struct=None):
    """Value of `constexpr int name = ...;` in file rel (inside `struct` when given)."""
    scope = _scope(rel, struct)
    m = re.search(r"\bconstexpr\s+int\s+%s\s*=\s*([^;]+);" % re.escape(name), scope)
    if m is None:
        raise KeyError(f"constexpr int {name} not found in {rel}" + (f" (struct {struct})" if struct else ""))
    expr = m.group(1)
    if not re.fullmatch(r"[\w\s+\-*/()]+", expr):
        raise ValueError(f"{rel}: {name} = {expr} is not a plain integer expression")
    env = {n: constant(rel, n, struct) for n in set(re.findall(r"[A-Za-z_]\w*", expr))}
    return int(eval(expr.replace("/", "//"), {"__builtins__": {}}, env))


def template_instances(rel, template):
    """The leading integer arguments of every `template<a, b, ...>` spelled in file rel (up to
    the first argument that is not an integer literal)."""
    text = (ROOT / rel).read_text()
    return [
        tuple(int(x) for x in m.group(1).split(","))
        for m in re.finditer(r"\b%s<\s*(\d+(?:\s*,\s*\d+)*)\s*[,>]" % re.escape(template), text)
    ]


def decode_split():
    """Split-KV decode: DecodeSplitConfig (decode_args.cuh), the plan constants (decode.cu),
    and the chunk width of plain 16-bit K/V (vec.cuh kChunkBytes / 2 bytes)."""
    args = f"{CUDA_INC}/decode_args.cuh"
    return dict(
        warps=constant(args, "kWarps", "DecodeSplitConfig"),
        iters_per_tile=constant(args, "kItersPerTile", "DecodeSplitConfig"),
        stages=constant(args, "kStages", "DecodeSplitConfig"),
        max_splits=constant(args, "kDecodeMaxSplits"),
        min_split_keys=constant("cuda/kernels/decode.cu", "kMinSplitKeys"),
        elems_per_chunk=constant(f"{CUDA_INC}/vec.cuh", "kChunkBytes") // 2,
    )


def prefill_fa2():
    """Tensor-core prefill: warps per CTA (Fa2Config) and the instantiated (D, MT, BN) configs
    of prefill.cu."""
    fa2 = f"{CUDA_INC}/prefill_fa2.cuh"
    return dict(
        warps=constant(fa2, "kWarps", "Fa2Config"),
        threads=constant(fa2, "kThreads", "Fa2Config"),
        configs=sorted({c[:3] for c in template_instances("cuda/kernels/prefill.cu", "Fa2Config")}),
    )
