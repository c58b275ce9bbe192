"""Issue 32 on a GPU: a GenAI builder CUDA folder quantized by fptq-graph runs in onnxruntime-genai's CUDA
package unedited and gives the tokens it gives on the CPU. Skips, saying why, where onnxruntime-genai has
no CUDA, our op library was built without CUDA kernels, or onnxruntime has no CUDA provider (every machine
but the GPU one: scripts/gpu/genai_gpu.sh runs it there). The CPU side of the same plumbing is
tests/models/test_model_folders.py::test_builder_cuda_folder_keeps_its_gpu_settings_and_runs_on_the_cpu."""
import numpy as np
import onnxruntime as ort
import pytest

from fptq_graph import runtime
from fptq_graph.cli import main
from helpers import genai_generator

og = pytest.importorskip("onnxruntime_genai")


def _unavailable() -> str:
    if not og.is_cuda_available():
        return f"onnxruntime-genai {og.__version__} here has no CUDA (install onnxruntime-genai-cuda)"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider"
    if not runtime.library_info()["cuda"]:
        return "the op library was built without CUDA kernels"
    return ""


PROMPT = "def fibonacci(n):"


def first_logits_and_tokens(folder, providers, count):
    model, generator = genai_generator(folder, PROMPT, providers)
    generator.generate_next_token()
    logits = np.asarray(generator.get_output("logits"), np.float64).reshape(-1)[-model_vocab(folder):]
    tokens = [int(generator.get_next_tokens()[0])]
    while not generator.is_done() and len(tokens) < count:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return logits, tokens


def model_vocab(folder) -> int:
    import json
    return json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"]


@pytest.mark.skipif(bool(_unavailable()), reason=_unavailable() or "CUDA available")
@pytest.mark.parametrize("form", ["w4a8", "ort"])
def test_cuda_folder_gives_the_cpu_tokens_in_genai_cuda(form, builder_cuda_folder, calib_text, tmp_path):
    out = tmp_path / form
    assert main(["quantize", str(builder_cuda_folder), "-o", str(out), "--calib", str(calib_text), "--calib-samples", "4",
                 "--seq-len", "32", "--group-size", "32", "--format", form, "-q"]) == 0
    cuda_logits, cuda_tokens = first_logits_and_tokens(out, None, 32)       # the folder's own provider: CUDA
    cpu_logits, cpu_tokens = first_logits_and_tokens(out, [], 32)            # providers cleared: CPU
    err = float(np.abs(cuda_logits - cpu_logits).max() / np.abs(cpu_logits).max())
    print(f"\n{form}: first-step logits CUDA vs CPU, max relative {err:.2e}; tokens equal: {cuda_tokens == cpu_tokens}")
    # fp16 activations on both; static int8 codes may move one step where TF32/fp16 paths differ upstream
    assert err <= 2e-2
    if cuda_tokens != cpu_tokens:
        first = next(i for i, (a, b) in enumerate(zip(cuda_tokens, cpu_tokens)) if a != b)
        assert first > 0, f"the first token already differs: CUDA {cuda_tokens[:4]} CPU {cpu_tokens[:4]}"
