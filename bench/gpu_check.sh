#!/usr/bin/env bash
# The one command for a GPU machine (no network needed):
#   bench/gpu_check.sh OUTDIR [--dry-run]
# Builds vattn for this GPU's architecture, runs the whole test suite with VATTN_REQUIRE_GPU=1,
# compute-sanitizer (memcheck, racecheck) on bench/sanitizer_cases.py, the microbenchmarks
# (bench/run.py), the memory-manager latency (bench/manager_latency.py) and bench/ptxas_report.sh
# when present, then writes OUTDIR/report.md (+ raw JSON, logs) and prints a summary table last.
#
# Every step runs under `timeout`, against one overall deadline (VATTN_GPU_CHECK_BUDGET seconds,
# default 560) so the script ends in under 10 minutes even if a step hangs; each step also keeps
# back the minimum time of the steps after it. A failing step is reported and the script goes on,
# except a failed build (nothing after it could mean anything): the report then holds the build
# log tail.
# --dry-run (or VATTN_GPU_CHECK_DRY=1): no GPU needed; skips the build, sanitizer and GPU steps
# and runs the CPU variants (bench tests, run.py --device cpu --quick, ...) to test this script.
# OUTDIR ends with report.md, summary.json, bench.json, manager.json, junit.xml, logs.tar.gz and
# logs/ (VATTN_GPU_CHECK_PACK_LOGS=1 drops logs/ after packing: 6 files in all, for runners that
# bring back a bounded number of files, e.g. OUTDIR=$OUT on a lent device machine).
# Environment: PYTHON (default python), VATTN_GPU_ARCH (override the detected arch),
# VATTN_SANITIZER_FILTER (default "--kernel-name kns=vattn": check vattn's kernels only).
set -uo pipefail

OUT=${1:?usage: bench/gpu_check.sh OUTDIR [--dry-run]}
DRY=${VATTN_GPU_CHECK_DRY:-0}
[[ "${2:-}" == "--dry-run" ]] && DRY=1
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python}
START=$(date +%s)
BUDGET=${VATTN_GPU_CHECK_BUDGET:-560}
LOGS="$OUT/logs"
mkdir -p "$LOGS" || exit 2
STEPS="$LOGS/steps.tsv"
: >"$STEPS"

log() { echo "[gpu_check $(($(date +%s) - START))s] $*" >&2; }

# record NAME STATUS SECONDS NOTE
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STEPS"; }

# run_step NAME CAP RESERVE SIGNAL LOG cmd... : runs cmd with a timeout of min(CAP, time left -
# RESERVE - 15 s for the report); RESERVE is what the later steps need at least.
run_step() {
  local name=$1 cap=$2 reserve=$3 sig=$4 logf=$5
  shift 5
  local left=$((START + BUDGET - $(date +%s) - reserve - 15))
  local t=$cap
  ((left < t)) && t=$left
  if ((t < 5)); then
    record "$name" "NO TIME" 0 "no time left in the ${BUDGET}s budget"
    log "$name: skipped (no time left)"
    return 99
  fi
  log "$name: running (limit ${t}s): $*"
  local t0 rc dt
  t0=$(date +%s)
  timeout -s "$sig" -k 15 "$t" "$@" >"$logf" 2>&1
  rc=$?
  dt=$(($(date +%s) - t0))
  if ((rc == 0)); then
    record "$name" "ok" "$dt" ""
  elif ((rc == 124 || rc == 137)); then
    record "$name" "TIMEOUT" "$dt" "killed after ${t}s; see $(basename "$logf")"
  else
    record "$name" "FAILED" "$dt" "exit $rc; see $(basename "$logf")"
  fi
  log "$name: exit $rc after ${dt}s"
  return $rc
}

skip() { record "$1" "SKIPPED" 0 "$2"; log "$1: skipped ($2)"; }

# ---------------------------------------------------------------- environment and arch
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
  echo "host: $(hostname) cpus: $(nproc)"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>&1 | head -4 | sed 's/^/gpu: /'
  else
    echo "gpu: none (no nvidia-smi)"
  fi
  command -v nvcc >/dev/null && nvcc --version | tail -2 | head -1 | sed 's/^/nvcc: /'
  timeout 60 "$PY" -c 'import torch, sys; print("python:", sys.version.split()[0]); print("torch:", torch.__version__, "cuda", torch.version.cuda)' 2>&1
  command -v compute-sanitizer >/dev/null && echo "compute-sanitizer: $(compute-sanitizer --version 2>&1 | tail -1)"
} >"$LOGS/environment.txt" 2>&1
if [[ -n "${VATTN_GPU_ARCH:-}" ]]; then
  ARCH=$VATTN_GPU_ARCH
else
  CC=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
  case "$CC" in
    "") ARCH="" ;;
    9.0) ARCH=90a ;;  # Hopper: arch-specific features (wgmma, setmaxnreg) need the 'a' target
    *) ARCH=${CC/./} ;;
  esac
fi
if [[ -z "$ARCH" ]]; then
  if ((DRY)); then ARCH="90a"; echo "arch: 90a (assumed: dry run, no GPU)" >>"$LOGS/environment.txt"
  else echo "arch: none (nvidia-smi found no GPU)" >>"$LOGS/environment.txt"; fi
else
  echo "arch: $ARCH" >>"$LOGS/environment.txt"
fi
log "arch=${ARCH:-none} dry=$DRY out=$OUT"

# ---------------------------------------------------------------- build
BUILD_OK=1
if ((DRY)); then
  skip build "dry run"
  run_step import 60 300 TERM "$LOGS/import.log" "$PY" -c 'import vattn; print(vattn.__version__, "cuda:", vattn._C.built_with_cuda)'
elif [[ -z "$ARCH" ]]; then
  record build "FAILED" 0 "no GPU found by nvidia-smi"
  BUILD_OK=0
else
  # Tests + sanitizers + bench + manager need at least ~200 s after the build.
  if ! CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$ARCH ${CMAKE_ARGS:-}" VATTN_CUDA=ON \
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    run_step build 330 200 TERM "$LOGS/build.log" "$PY" -m pip install --no-build-isolation --no-deps -v .; then
    BUILD_OK=0
  else
    # Import from outside the repository so the installed wheel is what runs.
    (cd /tmp && run_step import 60 190 TERM "$LOGS/import.log" "$PY" -c \
      'import vattn; assert vattn._C.built_with_cuda, "built without CUDA"; print(vattn.__version__, vattn._C.cuda_architectures if hasattr(vattn._C, "cuda_architectures") else "")') || BUILD_OK=0
  fi
fi

if ((BUILD_OK)); then
  # ---------------------------------------------------------------- decode plan
  # The split-KV decode plan of single-row long-context decode (32K keys), printed by the library
  # (VATTN_LOG_DECODE_PLAN=1): SM count, the real occupancy of the launched instance, splits, waves.
  if ((DRY)); then
    skip decode-plan "dry run"
  else
    (cd /tmp && VATTN_LOG_DECODE_PLAN=1 run_step decode-plan 60 190 TERM "$LOGS/decode_plan.txt" "$PY" -c '
import torch, vattn
n = 32768
for hq, hkv, d in ((32, 8, 128), (32, 8, 64), (64, 8, 128), (28, 4, 128)):
    k = torch.randn(1, n, hkv, d, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, hq, d, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((1,), n, dtype=torch.int32, device="cuda")
    vattn.decode_attention(q, k, torch.randn_like(k), lens, max_seqlen_k=n)
torch.cuda.synchronize()
')
  fi
  # ---------------------------------------------------------------- tests
  if ((DRY)); then
    # shellcheck disable=SC2086  # a list of paths
    run_step tests 150 150 INT "$LOGS/tests.log" "$PY" -m pytest ${VATTN_DRY_TEST_PATHS:-bench} -q -rfE \
      -p no:cacheprovider --benchmark-disable --junitxml="$OUT/junit.xml"
  else
    VATTN_REQUIRE_GPU=1 run_step tests 180 150 INT "$LOGS/tests.log" "$PY" -m pytest tests bench -q -rfE \
      -p no:cacheprovider --benchmark-disable --durations=15 --junitxml="$OUT/junit.xml"
  fi

  # ---------------------------------------------------------------- sanitizers
  if ((DRY)); then
    run_step sanitizer-cases-cpu 120 100 TERM "$LOGS/sanitizer_cpu.log" "$PY" bench/sanitizer_cases.py --device cpu
    skip memcheck "dry run"
    skip racecheck "dry run"
  elif ! command -v compute-sanitizer >/dev/null; then
    skip memcheck "compute-sanitizer not found"
    skip racecheck "compute-sanitizer not found"
  else
    FILTER=${VATTN_SANITIZER_FILTER---kernel-name kns=vattn}
    compute-sanitizer --help 2>&1 | grep -q -- "--kernel-name" || FILTER=""
    # shellcheck disable=SC2086  # FILTER is a list of options
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_step memcheck 90 120 TERM "$LOGS/memcheck.log" \
      compute-sanitizer --tool memcheck --error-exitcode 3 $FILTER "$PY" bench/sanitizer_cases.py
    # shellcheck disable=SC2086
    run_step racecheck 90 90 TERM "$LOGS/racecheck.log" \
      compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 3 $FILTER \
      "$PY" bench/sanitizer_cases.py --only attention --only kv
  fi

  # ---------------------------------------------------------------- benchmarks
  DEV=cuda
  ((DRY)) && DEV=cpu
  QUICK=""
  ((DRY)) && QUICK="--quick"
  left=$((START + BUDGET - $(date +%s) - 60 - 15))
  cap=200
  ((left < cap)) && cap=$left
  # run.py skips its remaining cases once its own budget is spent, so it ends before the timeout.
  run_step bench $((cap > 0 ? cap : 0)) 60 TERM "$LOGS/bench.log" "$PY" bench/run.py --device $DEV $QUICK \
    --time-budget $((cap > 60 ? cap - 40 : 20)) --json "$OUT/bench.json" --markdown "$LOGS/bench.md"
  run_step manager-latency 60 20 TERM "$LOGS/manager.log" "$PY" bench/manager_latency.py --device $DEV $QUICK \
    --json "$OUT/manager.json" --markdown "$LOGS/manager.md"
  if [[ -f bench/ptxas_report.sh ]] && ! ((DRY)); then
    VATTN_PTXAS_JOBS=$(nproc) run_step ptxas-report 60 0 TERM "$LOGS/ptxas.txt" bash bench/ptxas_report.sh "$ARCH"
  elif ((DRY)); then
    skip ptxas-report "dry run"
  else
    skip ptxas-report "bench/ptxas_report.sh not present"
  fi
else
  for s in decode-plan tests memcheck racecheck bench manager-latency ptxas-report; do skip "$s" "build failed"; done
fi

# ---------------------------------------------------------------- report
# OUTDIR keeps report.md, summary.json, bench.json, manager.json, junit.xml and logs.tar.gz (few
# files, so a tool that fetches a bounded number of files gets everything); the logs stay unpacked
# in OUTDIR/logs too unless VATTN_GPU_CHECK_PACK_LOGS=1 removes them after packing.
"$PY" - "$OUT" "$DRY" "$BUDGET" "$START" <<'PYEOF'
import json, os, re, sys, time
import xml.etree.ElementTree as ET

out, dry, budget, start = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])


logs = os.path.join(out, "logs")


def read(name, tail=None):
    p = os.path.join(logs, name)
    if not os.path.exists(p):
        return None
    with open(p, errors="replace") as f:
        text = f.read()
    if tail:
        text = "\n".join(text.splitlines()[-tail:])
    return text


steps = [line.split("\t") for line in (read("steps.tsv") or "").splitlines() if line.strip()]
notes = {}
# Tests: counts from the junit xml (written even when pytest is interrupted by the timeout).
junit = os.path.join(out, "junit.xml")
if os.path.exists(junit):
    try:
        root = ET.parse(junit).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        c = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        c["passed"] = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
        notes["tests"] = f"{c['passed']} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped"
    except ET.ParseError as e:
        notes["tests"] = f"junit unreadable: {e}"
for tool in ("memcheck", "racecheck"):
    text = read(f"{tool}.log") or ""
    m = re.findall(r"(ERROR SUMMARY: .*|RACECHECK SUMMARY: .*)", text)
    cases = re.findall(r"sanitizer_cases: .*", text)
    notes[tool] = "; ".join(m[-1:] + cases[-1:])
plans = re.findall(r"vattn decode plan: .*", read("decode_plan.txt") or "")
if plans:
    m = re.search(r"occupancy=(\d+).*splits=(\d+).*waves=(\d+) fill=([\d.]+%)", plans[0])
    notes["decode-plan"] = (f"32K row, 32 q / 8 kv heads, d=128: occupancy {m[1]}, {m[2]} splits, {m[3]} waves, "
                            f"fill {m[4]}" if m else plans[0])
if read("sanitizer_cpu.log"):
    notes["sanitizer-cases-cpu"] = "; ".join(re.findall(r"sanitizer_cases: .*", read("sanitizer_cpu.log")))
bench = None
if os.path.exists(os.path.join(out, "bench.json")):
    with open(os.path.join(out, "bench.json")) as f:
        bench = json.load(f)
    rows = bench["rows"]
    bad = [r for r in rows if r.get("ok") is False]
    dec = [r for r in rows if r["op"] == "decode" and r.get("pct_ceiling")]
    best = max((r["pct_ceiling"] for r in dec), default=None)
    notes["bench"] = (f"{len(rows)} rows, {len(bad)} mismatches"
                      + (f", decode up to {best:.0f}% of copy bandwidth" if best is not None else ""))
if os.path.exists(os.path.join(out, "manager.json")):
    with open(os.path.join(out, "manager.json")) as f:
        man = json.load(f)
    one = [r for r in man["steps"] if r["mode"] == "step" and not r["background"] and not r.get("pooled")]
    if one:
        notes["manager-latency"] = "step (sync): " + ", ".join(f"{r['n_live']} req {r['mean_us']:.0f} us" for r in one)

summary = ["| step | status | seconds | note |", "|---|---|---|---|"]
for name, status, secs, note in steps:
    extra = notes.get(name, "")
    summary.append(f"| {name} | {status} | {secs} | {'; '.join(x for x in (note, extra) if x)} |")
overall = "PASS" if all(s[1] in ("ok", "SKIPPED") for s in steps) and not any(
    s[0] == "build" and s[1] != "ok" for s in steps if not dry) else "FAIL"

lines = [f"# vattn GPU check{' (DRY RUN: no GPU steps)' if dry else ''}", "",
         f"Overall: **{overall}** in {int(time.time()) - start} s (budget {budget} s).", "",
         "```", (read("environment.txt") or "").strip(), "```", "", "## Summary", ""] + summary
build_failed = any(s[0] == "build" and s[1] != "ok" for s in steps)
if build_failed and read("build.log") is not None:
    lines += ["", "## Build log (tail)", "", "```", read("build.log", tail=80), "```"]
if read("import.log") is not None and any(s[0] == "import" and s[1] != "ok" for s in steps):
    lines += ["", "## Import log", "", "```", read("import.log", tail=40), "```"]
if plans:
    lines += ["", "## Decode split plans (32K keys, one row)", "", "```"] + plans + ["```"]
if read("tests.log") is not None:
    lines += ["", "## Tests", "", notes.get("tests", ""), "", "```", read("tests.log", tail=60), "```"]
for tool in ("memcheck", "racecheck", "sanitizer_cpu"):
    if read(f"{tool}.log") is not None:
        title = "sanitizer_cases.py on CPU (dry run)" if tool == "sanitizer_cpu" else f"compute-sanitizer {tool}"
        lines += ["", f"## {title}", "", "```", read(f"{tool}.log", tail=40), "```"]
if read("bench.md") is not None:
    lines += ["", "## Microbenchmarks (bench/run.py)", "", read("bench.md")]
elif read("bench.log") is not None:
    lines += ["", "## Microbenchmarks (bench/run.py): log", "", "```", read("bench.log", tail=40), "```"]
if read("manager.md") is not None:
    lines += ["", "## Memory manager latency (bench/manager_latency.py)", "", read("manager.md")]
elif read("manager.log") is not None:
    lines += ["", "## Memory manager latency: log", "", "```", read("manager.log", tail=30), "```"]
if read("ptxas.txt") is not None:
    lines += ["", "## Kernel resources (bench/ptxas_report.sh)", "", "```", read("ptxas.txt", tail=80), "```"]
with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"overall": overall, "dry_run": dry, "steps": [dict(zip(("step", "status", "seconds", "note"), s)) for s in steps],
               "notes": notes}, f, indent=1)
print(f"\nreport: {os.path.join(out, 'report.md')}\n")
print(f"vattn GPU check: {overall}")
print("\n".join(summary))
sys.exit(0 if overall == "PASS" else 1)
PYEOF
status=$?
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs 2>/dev/null
[[ "${VATTN_GPU_CHECK_PACK_LOGS:-0}" == 1 ]] && rm -rf "$LOGS"
exit $status
