#!/usr/bin/env bash
# Issue 6's end-to-end benchmark alone (benchmarks/e2e_gpu.py, a 1.1B LLaMA in fp16, ort and w4a8 forms).
# Needs the op library built first (scripts/gpu/runbook.sh --steps build, or a whole runbook call).
exec bash "$(dirname "$0")/runbook.sh" --steps e2e "$@"
