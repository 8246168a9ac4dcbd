#!/usr/bin/env bash
# The issue-4 targets that only a GPU machine can settle, in one run (about 5 minutes on an H100):
# fit (torch k-means on CUDA vs scikit-learn on the CPU), embed (steady state vs bare forward) and
# assign (on CUDA vs reading the store). Run from the repository root: bash benchmarks/gpu_targets.sh
# (on a machine without internet, first the wheels of benchmarks/device_wheels.sh, as the README says)
set -uo pipefail
threads=$(nproc)
failed=()
measure() {  # one measurement; a failure is reported at the end and does not stop the others
  echo "== $*"
  "$@" || failed+=("$* (exit $?)")
}
measure python -m umtfss.cli doctor  # what the machine gives the stages, for the log
measure python benchmarks/fit_vs_sklearn.py --device cuda --threads "$threads"
for resize_on in device workers; do  # the default on a GPU (uint8 to the device, resized there), then the old way
  measure python benchmarks/embed_throughput.py --backbone resnet50-imagenet --image-size 473 --images 4000 \
      --workers $((threads > 4 ? threads - 4 : 1)) --dim 256 --batch 32 --resize-on "$resize_on"
done
measure python benchmarks/assign_throughput.py --threads "$threads" --device cuda
if ((${#failed[@]})); then
  printf 'failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
