#!/usr/bin/env bash
# The GPU check (issue 15): the GPU tests, then bench/txt2img.py for SDPA, compile and compile + channels_last at
# batch 1 and 8 (full SD1.5 widths, fp16, one process per row), and one markdown table of the results.
# Meant to finish within 8 minutes on one GPU; rows that would start past that are listed as not run. Exit status 1
# if a test failed or a row failed or did not run.
#
#   bash bench/gpu.sh            # on a GPU machine
#   bash bench/gpu.sh --dry-run  # the same steps on the CPU with the tiny test model (CI checks the script)
set -uo pipefail  # no -e: a failed step is reported in the table and in the exit status, the rest still runs
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

dry=0
case "${1:-}" in
  --dry-run) dry=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu.sh [--dry-run]" >&2; exit 2 ;;
esac
budget=480  # seconds for the whole script
if (( dry )); then
  # tiny model, 64 px, 2 steps, 2 images: checks every step of the script, measures nothing
  bench=(--tiny --device cpu --precision fp32 --size 64 --steps 2 --images 2 --rounds 1 --threads 1 --warmup-steps 2)
  batches=(1)
  budget=300
else
  bench=(--full --device cuda --precision fp16 --size 512 --steps 20 --images 8 --rounds 2)
  batches=(1 8)
fi
out=$(mktemp -d)
bench+=(--model-dir "$out/model")  # built by the first row, reused by the others
status=0

# xformers: only if missing, pinned to the installed torch so pip cannot swap torch; failing to install is not fatal
if "$PY" -c "import xformers.ops" 2>/dev/null; then
  echo "xformers: present"
elif (( dry )); then
  echo "xformers: missing (dry run installs nothing; its GPU test skips)"
else
  torch_version=$("$PY" -c "import torch; print(torch.__version__)")
  if "$PY" -m pip install -q xformers "torch==$torch_version"; then
    echo "xformers: installed"
  else
    echo "xformers: could not be installed for torch $torch_version; its GPU test skips"
  fi
fi

echo "== pytest -m gpu tests/test_gpu.py"
timeout 240 "$PY" -m pytest -q -m gpu -rs tests/test_gpu.py || { echo "GPU tests FAILED"; status=1; }

# name|batch|sdbatch options; each row is its own process, so compile's warm-up and caches are its own.
# The eager rows first, then compile at the larger batch: what matters most runs before the budget can run out.
rows=()
for b in "${batches[@]}"; do rows+=("sdpa|$b|"); done
if (( dry )); then
  # one compiled row covers both code paths: a cold inductor compile costs ~75 s per row on 2 CPU cores, and CI
  # starts cold; the table says which rows the dry run leaves out
  rows+=("compile+channels_last|1|--compile --channels-last")
else
  for (( i = ${#batches[@]} - 1; i >= 0; i-- )); do
    b=${batches[i]}
    rows+=("compile|$b|--compile" "compile+channels_last|$b|--compile --channels-last")
  done
fi
for row in "${rows[@]}"; do
  IFS='|' read -r name b options <<<"$row"
  file="$out/$name-b$b.json"
  left=$(( budget - SECONDS ))
  if (( left < 30 )); then
    echo "== $name, batch $b: not run, the ${budget} s budget is spent"
    status=1  # a missing row is a result CI should notice too
    continue
  fi
  echo "== $name, batch $b"
  # shellcheck disable=SC2086  # options is a list of words
  if ! timeout "$left" "$PY" bench/txt2img.py "${bench[@]}" --batch-size "$b" $options --json "$file" \
      >"$file.log" 2>&1; then
    echo "   FAILED or timed out; the end of its output:"; tail -20 "$file.log"; rm -f "$file"; status=1
  fi
done

"$PY" - "$out" "$dry" "${batches[@]}" <<'EOF'
"""One markdown table: each configuration's it/s and images/s, and its speed over diffusers eager in the same run."""
import json
import sys
from pathlib import Path

folder, dry, batches = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3:]
print()
print("| configuration | batch | it/s | images/s | diffusers eager images/s (same run) | × diffusers eager |")
print("|---|---|---|---|---|---|")
for batch in batches:
    for name in ("sdpa", "compile", "compile+channels_last"):
        path = folder / f"{name}-b{batch}.json"
        if not path.exists():
            why = "left out of the dry run (compile time)" if dry and name == "compile" else "not run or failed"
            print(f"| sdbatch {name} | {batch} | {why} | | | |")
            continue
        r = json.loads(path.read_text())
        ours, eager = r["sdbatch"], r["diffusers"]
        print(f"| sdbatch {name} | {batch} | {ours['it_s']:.2f} | {ours['images_s']:.2f} | {eager['images_s']:.2f} "
              f"| {ours['images_s'] / eager['images_s']:.2f} |")
r = next((json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))), None)
if r:
    model = "tiny test model" if r["tiny"] else ("SD1.5 widths" if r["full"] else "half SD1.5 widths")
    print(f"\n{model}, random weights, {r['device']} {r['precision']}, {r['size']}x{r['size']}, {r['steps']} DDIM "
          f"steps, {r['images']} images per round, best of {r['rounds']} round(s) of each, alternating. it/s = UNet "
          "steps x batches per second; x diffusers eager = images/s over the diffusers pipeline's in the same "
          "process (higher = faster; it stays eager in every row)")
if dry:
    print("dry run: CPU and the tiny model, so these numbers only show that the script works")
EOF
rm -rf "$out"
echo "bench/gpu.sh: $SECONDS s"
exit "$status"
