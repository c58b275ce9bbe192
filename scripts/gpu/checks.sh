#!/usr/bin/env bash
# The GPU checks without the end-to-end benchmark: build, compiler checks, CUDA-vs-CPU test,
# compute-sanitizer, op_bench. See scripts/gpu/runbook.sh (everything in one call) and DEVELOPERS.md.
exec bash "$(dirname "$0")/runbook.sh" --steps build,compiler,pytest,sanitize,bench "$@"
