#!/usr/bin/env bash
# Fetch into .whl/ the Python 3.12 x86-64 wheels that a bare GPU machine (which cannot download)
# lacks for gpu_targets.sh: its image has torch, numpy, pandas, pyarrow, scikit-learn, scikit-image,
# tqdm, pyyaml and pillow, but not zarr 3, numcodecs, jsonschema or faiss. Run on a machine with
# PyPI access, from the repository root: bash benchmarks/device_wheels.sh [DEST] (default .whl).
# The wheels are kept out of git (.git/info/exclude) and travel with the device call as carry: [".whl"].
set -euo pipefail
dest=${1:-.whl}
wheels=(
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0  # the versions CI installs
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  faiss-cpu==1.15.1  # attrs and typing-extensions are there already
)
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
           manylinux1_x86_64 manylinux_2_24_x86_64; do
  platforms+=(--platform "$tag")
done
mkdir -p "$dest"
if [[ -d .git ]] && ! grep -qxF "/$dest/" .git/info/exclude 2>/dev/null; then
  echo "/$dest/" >> .git/info/exclude  # never committed: 30 MB of binaries
fi
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$dest" "${wheels[@]}"
ls -1 "$dest"
du -sh "$dest"
