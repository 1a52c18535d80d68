#!/usr/bin/env bash
# A stand-in for the GPU node's Python, for `make gpu-kit-smoke`: a fresh venv holding torch,
# torchvision and the packages gpu_kit/target-installed.txt names (from the index, at versions
# within constraints.txt), and nothing of raysweep's own. Built once; reused while the list,
# the constraints and this script are unchanged.
#   gpu_kit/target-venv.sh VENV
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:?usage: gpu_kit/target-venv.sh VENV}
PYTHON=${PYTHON:-python3}
# torch and torchvision first, as a site installs them: the pair this machine's pip takes from disk.
TORCH=${TARGET_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
key=$(cat gpu_kit/target-installed.txt constraints.txt "$0" | sha256sum | cut -c1-16)-$(echo "$TORCH" | tr ' =' '_-')
if [ -f "$VENV/.target-$key" ]; then
    echo "target-venv: $VENV is up to date"
    exit 0
fi
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086  # TORCH is a list of requirements
"$VENV/bin/python" -m pip install --quiet $TORCH
names=$(sed -e 's/#.*//' -e '/^\s*$/d' gpu_kit/target-installed.txt | grep -vxE 'torch|torchvision')
# shellcheck disable=SC2086  # one requirement a word
"$VENV/bin/python" -m pip install --quiet -c constraints.txt $names
touch "$VENV/.target-$key"
echo "target-venv: $VENV: $("$VENV/bin/python" -m pip list 2>/dev/null | wc -l) packages, $(du -sh "$VENV" | cut -f1)"
