#!/usr/bin/env bash
# Compiler resource report of the CUDA kernels: registers, static shared memory, stack and
# spills per kernel and architecture, from ptxas -v. Exits non-zero when any kernel spills
# (or a file fails to compile), so CI can run it as a check.
#   bench/ptxas_report.sh                 # sm_80 and sm_90a
#   bench/ptxas_report.sh 80 86 89 90a    # any list of architectures
#   VATTN_PTXAS_JOBS=2 (parallel nvcc processes), NVCC=/path/to/nvcc,
#   VATTN_PTXAS_FILES="decode*.cu" (a subset of cuda/kernels), VATTN_PTXAS_EXTRA="-maxrregcount=64"
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
archs=("$@")
[ ${#archs[@]} -eq 0 ] && archs=(80 90a)
nvcc=${NVCC:-nvcc}
jobs=${VATTN_PTXAS_JOBS:-2}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Same flags as CMakeLists.txt uses for the module.
flags=(-std=c++17 -O3 --expt-relaxed-constexpr -lineinfo --use_fast_math -Xptxas=-v -Xptxas=-warn-spills
       -DVATTN_WITH_CUDA=1 "-DVATTN_CUDA_ARCHS=\"report\"" -I"$root/cuda/include" -I"$root/cuda" ${VATTN_PTXAS_EXTRA:-})

compile_one() {  # arch file -> $work/<arch>__<name>.log (and .fail on error)
  local arch=$1 file=$2 log
  log="$work/${arch}__$(basename "$file" .cu).log"
  if ! "$nvcc" "${flags[@]}" -gencode "arch=compute_${arch},code=sm_${arch}" -c "$file" -o /dev/null >"$log" 2>&1; then
    touch "${log%.log}.fail"
  fi
}
export nvcc work

tasks=()
for arch in "${archs[@]}"; do
  for f in "$root"/cuda/kernels/${VATTN_PTXAS_FILES:-*.cu}; do [ -e "$f" ] && tasks+=("$arch $f"); done
done
printf '%s\n' "${tasks[@]}" | xargs -P "$jobs" -L 1 bash -c "$(declare -p flags); $(declare -f compile_one); compile_one \"\$0\" \"\$1\""

status=0
for f in "$work"/*.fail; do
  [ -e "$f" ] || continue
  echo "COMPILE FAILED: $(basename "${f%.fail}")" >&2
  cat "${f%.fail}.log" >&2
  status=1
done

python3 - "$work" "${archs[@]}" <<'PY' || status=1
import glob, os, re, subprocess, sys

work, archs = sys.argv[1], sys.argv[2:]
entry_re = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\w+)'")
props_re = re.compile(r"Function properties for (\S+)")
spill_re = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
used_re = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")

rows = []  # (arch, file, mangled, regs, smem, stack, spill_st, spill_ld)
for log in sorted(glob.glob(os.path.join(work, "*.log"))):
    arch, name = os.path.basename(log)[:-4].split("__", 1)
    cur, props, spill = None, None, (0, 0, 0)
    for line in open(log, errors="replace"):
        m = entry_re.search(line)
        if m:
            cur, spill = m.group(1), (0, 0, 0)
            continue
        m = props_re.search(line)
        if m:
            props = m.group(1)
            continue
        m = spill_re.search(line)
        if m and props == cur:
            spill = tuple(int(x) for x in m.groups())
            continue
        m = used_re.search(line)
        if m and cur is not None:
            rows.append((arch, name + ".cu", cur, int(m.group(1)), int(m.group(2) or 0)) + spill)
            cur = None

def demangle(names):
    for tool in ("cu++filt", "c++filt", "llvm-cxxfilt"):
        try:
            out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            continue
        res = out.splitlines()
        if len(res) == len(names):
            return res
    return list(names)

def short(sig):
    # drop the parameter list and the return type: "void ns::kernel<...>(args)" -> "ns::kernel<...>"
    sig = sig.replace("(anonymous namespace)::", "")
    depth = 0
    for i, ch in enumerate(sig):
        if ch == "<": depth += 1
        elif ch == ">": depth -= 1
        elif ch == "(" and depth == 0:
            sig = sig[:i]
            break
    sig = re.sub(r"^void ", "", sig)
    return sig.replace("vattn::cuda::", "").replace("vattn::", "")

names = demangle([r[2] for r in rows])
order = {a: i for i, a in enumerate(archs)}
table = sorted((("sm_" + r[0], r[1], short(n)) + r[3:] for r, n in zip(rows, names)),
               key=lambda r: (order.get(r[0][3:], 99), r[1], r[2]))
head = ("arch", "file", "kernel", "regs", "smem B", "stack B", "spill st B", "spill ld B")
w = [max(len(str(x)) for x in col) for col in zip(head, *table)] if table else [len(h) for h in head]
fmt = "  ".join(("{:<%d}" if i < 3 else "{:>%d}") % w[i] for i in range(len(head)))
print("ptxas resource report (" + ", ".join("sm_" + a for a in archs) + "); smem = static shared memory,"
      " dynamic shared memory is set at launch")
print()
print(fmt.format(*head))
print("  ".join("-" * x for x in w))
for r in table:
    print(fmt.format(*r))
spills = [r for r in table if r[6] or r[7]]
print()
print(f"{len(table)} kernels, {len(spills)} with spills")
for r in spills:
    print(f"SPILL: {r[0]} {r[2]}: {r[6]} B stores, {r[7]} B loads")
sys.exit(1 if spills or not table else 0)
PY
exit $status
