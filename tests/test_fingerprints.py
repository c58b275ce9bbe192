"""What the compiler writes is held by fingerprints (tests/fingerprints.py): a change in any output graph
must be deliberate (regenerate with `python tests/fingerprints.py --write` and say why in the commit).

The full sweep (every recipe x form x group x symmetry on MiniLM and SmolLM2: `python tests/fingerprints.py`)
takes about an hour on 2 cores; CI holds every MiniLM case and a SmolLM2 subset that reaches each recipe,
each form and both groups and symmetries.
"""
import json

import pytest

import fingerprints as F

EXPECTED = json.loads(F.FINGERPRINTS.read_text())
SMOLLM2_CI = {
    *(f"smollm2/fptq-paper/{form}/g{g}/{sym}" for form in ("qdq", "w4a8", "ort", "ort-acc4") for g in (128, 32)
      for sym in ("sym", "asym")),
    "smollm2/fptq/qdq/g128/sym", "smollm2/fptq/qdq/g32/asym", "smollm2/fptq/w4a8/g128/sym", "smollm2/fptq/ort-acc4/g32/sym",
    *(f"smollm2/{r}/qdq/g128/sym" for r in ("fptq-awq", "fptq-measured", "naive-w4a8", "smoothquant-w4a8",
                                            "dynamic-w4a8", "w8a8-smoothquant", "rtn-w4a16", "awq-w4a16")),
}
CASES = [c for c in F.cases() if c["model"] == "minilm" or F.case_key(c) in SMOLLM2_CI]


def test_fingerprints_cover_the_ci_cases():
    """Every case CI runs has a stored fingerprint (a case without one would pass by not running)."""
    missing = [F.case_key(c) for c in CASES if F.case_key(c) not in EXPECTED]
    assert not missing, f"no stored fingerprint for {missing[:5]}"
    assert len(CASES) >= 130 + 20


@pytest.fixture(scope="module")
def models(minilm_onnx, smollm2_onnx):
    return {"minilm": minilm_onnx, "smollm2": smollm2_onnx}


@pytest.mark.parametrize("case", CASES, ids=F.case_key)
def test_output_graph_is_unchanged(models, case):
    key = F.case_key(case)
    assert F.fingerprint_case(models[case["model"]], case) == EXPECTED[key], \
        f"{key}: the quantized graph changed; if deliberate, regenerate tests/data/fingerprints.json"
