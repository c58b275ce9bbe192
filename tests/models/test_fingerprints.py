"""What the compiler writes is held by fingerprints (tests/fingerprints.py): a change in any output graph
must be deliberate (regenerate with `python tests/fingerprints.py --write` and say why in the commit).

The full sweep (every recipe x form x group x symmetry on MiniLM and SmolLM2: `python tests/fingerprints.py`)
takes about an hour on 2 cores; CI holds every MiniLM case and a SmolLM2 subset that reaches each recipe,
each form and both groups and symmetries.
"""
import pytest

import fingerprints as F

# What this CPU class recorded (fingerprints.py: ONNX Runtime's float kernels differ between AVX-512 and
# AVX2, so the calibration's last bits and then the codes do).
CPU = F.cpu_class()
EXPECTED = F.recorded(CPU)
SMOLLM2_CI = {
    *(f"smollm2/fptq-paper/{form}/g{g}/{sym}" for form in ("qdq", "w4a8", "ort", "ort-acc4") for g in (128, 32)
      for sym in ("sym", "asym")),
    "smollm2/fptq/qdq/g128/sym", "smollm2/fptq/qdq/g32/asym", "smollm2/fptq/w4a8/g128/sym", "smollm2/fptq/ort-acc4/g32/sym",
    "smollm2/fptq-rot/qdq/g128/sym", "smollm2/fptq-rot/w4a8/g32/sym",   # the rotated stream (issue 34)
    "smollm2/fptq-rot-measured/qdq/g128/sym", "smollm2/fptq-rot-measured/w4a8/g32/sym",
    *(f"smollm2/{r}/qdq/g128/sym" for r in ("fptq-awq", "fptq-measured", "naive-w4a8", "smoothquant-w4a8",
                                            "dynamic-w4a8", "w8a8-smoothquant", "rtn-w4a16", "awq-w4a16")),
}
CI_CASES = [c for c in F.cases() if c["model"] == "minilm" or F.case_key(c) in SMOLLM2_CI]
# A case this CPU class has no fingerprint for cannot be checked here; the coverage test names them.
CASES = [c for c in CI_CASES if F.case_key(c) in EXPECTED]


def test_fingerprints_cover_the_ci_cases():
    """The CI cases with a fingerprint recorded on this CPU class: all of them on a class the sweep ran on
    (x86-avx512 holds every CI case; x86-avx2 every MiniLM case and the SmolLM2 ones whose int8 head issue 30 did not change); on another, at least 20, the missing ones named."""
    assert len(CI_CASES) >= 130 + 20
    missing = [F.case_key(c) for c in CI_CASES if F.case_key(c) not in EXPECTED]
    print(f"\nCPU class {CPU}: {len(CASES)} of {len(CI_CASES)} CI cases recorded"
          + (f"; not recorded here (run tests/fingerprints.py --write on such a CPU): {missing}" if missing else ""))
    assert len(CASES) >= 20, f"CPU class {CPU}: only {len(CASES)} CI cases have a fingerprint; record them with " \
                             "python tests/fingerprints.py --write"


@pytest.fixture(scope="module")
def models(minilm_onnx, smollm2_onnx):
    return {"minilm": minilm_onnx, "smollm2": smollm2_onnx}


@pytest.mark.parametrize("case", CASES, ids=F.case_key)
def test_output_graph_is_unchanged(models, case):
    key = F.case_key(case)
    assert F.fingerprint_case(models[case["model"]], case) == EXPECTED[key], \
        f"{key}: the quantized graph changed; if deliberate, regenerate tests/data/fingerprints.json"
