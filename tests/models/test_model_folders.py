"""Folder in, folder out (issue 14): an ONNX Runtime GenAI model builder folder, made here offline by the
builder itself (onnxruntime-genai, a test dependency) from a small random LLaMA saved as a Hugging Face
folder with SmolLM2's tokenizer, quantizes unedited in every form; each output folder runs in
onnxruntime-genai and gives the same 20 greedy tokens as our own generation on the same file.

The random LLaMA's input norms are scaled up so that some linears land in FPTQ's LAE band: the builder
writes SkipSimplifiedLayerNormalization, and the folds into it are asserted, not just "it ran".
"""
import json
import shutil

import numpy as np
import onnx
import pytest

from fptq_graph.cli import main
from fptq_graph.ir.folder import TOKENIZER_FILES
from helpers import genai_generator

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is a test dependency (scripts/setup.sh)")

PROMPT = "def fibonacci(n):"
LAYERS = 2


def genai_tokens(folder, count: int = 20, providers: list[str] | None = None) -> list[int]:
    """Greedy tokens in onnxruntime-genai; providers: replace the folder's (None: as configured; []: CPU)."""
    _, generator = genai_generator(folder, PROMPT, providers)
    out = []
    while not generator.is_done() and len(out) < count:
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def our_tokens(folder, count: int = 20) -> list[int]:
    from transformers import AutoTokenizer

    from fptq_graph.calibration import tokenize_text
    from fptq_graph.generate import greedy_generate
    from fptq_graph.ir.folder import open_folder
    from fptq_graph.ir.load import load_split
    from fptq_graph.runtime import session

    found = open_folder(folder)
    inputs = list(load_split(found.model).proto.graph.input)
    prompt = tokenize_text(AutoTokenizer.from_pretrained(str(found.tokenizer)), PROMPT)
    return greedy_generate(session(found.model), prompt, count, None, inputs=inputs).tokens


@pytest.mark.parametrize("form", ["ort", "w4a8", "qdq"])
def test_builder_folder_quantizes_and_runs_in_genai(form, builder_folder, calib_text, tmp_path, capsys):
    out, report = tmp_path / f"out-{form}", tmp_path / "report.json"
    before = {p.name: p.read_bytes() for p in builder_folder.iterdir()}
    code = main(["quantize", str(builder_folder), "-o", str(out), "--calib", str(calib_text), "--calib-samples", "8",
                 "--seq-len", "64", "--group-size", "32", "--format", form, "--report", str(report), "-q"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert {p.name: p.read_bytes() for p in builder_folder.iterdir()} == before   # the input folder untouched
    # everything the builder wrote is there, the model (and its external data) replaced under its own name
    assert {p.name for p in builder_folder.iterdir()} - {"model.onnx.data"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "genai_config.json").read_text())
    options = config["model"]["decoder"]["session_options"]
    if form == "w4a8":
        assert options["custom_ops_library"] == "libfptq_ops.so" and (out / "libfptq_ops.so").is_file()
    if form == "qdq":
        assert options["graph_optimization_level"] == "ORT_ENABLE_BASIC" and "qdq form in onnxruntime-genai" in err
    data = json.loads(report.read_text())
    norms = [l["producer"] for l in data["layers"] if l["producer"]]
    assert {p.split(" ")[0] for p in norms} <= {"SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"}
    assert len(set(norms)) == 2 * LAYERS + 1                   # every layer's two norms, and the int8 LM head's final norm
    lae = [l["name"] for l in data["layers"] if l["scheme"] == "lae"]
    assert len(lae) >= LAYERS and all("qkv_proj" in name for name in lae), lae
    # The builder looks the tied embeddings up in Transpose(lm_head weight): that table is the int8
    # head's, held once; no float [vocab, hidden] copy is left.
    head = [l for l in data["layers"] if "lm_head" in l["name"]]
    assert len(head) == 1 and "table shared with embedding" in head[0]["reason"], head
    model = onnx.load(str(out / "model.onnx"))
    genai = json.loads((builder_folder / "genai_config.json").read_text())["model"]
    table = genai["vocab_size"] * genai["decoder"]["hidden_size"]
    floats = [t.name for t in model.graph.initializer if np.prod(t.dims) == table and t.data_type in (1, 10)]
    assert floats == [], floats
    assert genai_tokens(out) == our_tokens(out)


def test_generate_runs_a_folder(builder_folder, tmp_path, capsys, calib_text):
    out = tmp_path / "out"
    assert main(["quantize", str(builder_folder), "-o", str(out), "--calib-random", "2", "--seq-len", "16",
                 "--group-size", "32", "--format", "ort", "-q"]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", PROMPT, "--max-new-tokens", "5"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(PROMPT) and len(shown) > len(PROMPT)


def test_hugging_face_folder_is_exported_then_quantized(hf_folder, tmp_path, capsys):
    out = tmp_path / "from-hf"
    assert main(["quantize", str(hf_folder), "-o", str(out), "--calib-random", "2", "--seq-len", "16",
                 "--group-size", "32", "--format", "w4a8", "-q"]) == 0
    assert (out / "model.onnx").is_file() and (out / "tokenizer.json").is_file()
    assert not list(out.glob("*.safetensors"))   # the float weights stay behind
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", PROMPT, "--max-new-tokens", "3"]) == 0


def test_optimum_style_folder(builder_folder, tmp_path, capsys):
    """A folder with model.onnx and the tokenizer, no genai_config.json (optimum's layout)."""
    folder = tmp_path / "optimum"
    shutil.copytree(builder_folder, folder)
    (folder / "genai_config.json").unlink()
    out = tmp_path / "out"
    assert main(["quantize", str(folder), "-o", str(out), "--calib-random", "2", "--seq-len", "16",
                 "--group-size", "32", "-q"]) == 0
    assert (out / "model.onnx").is_file() and not (out / "genai_config.json").exists()


def test_eval_and_inspect_take_a_folder_and_find_the_tokenizer_beside_the_model(builder_folder, calib_text, tmp_path, capsys):
    """eval FOLDER (it used to say 'no such file' for a folder), eval FOLDER/model.onnx with tokenizer.json
    beside it and nothing recorded (it needed --tokenizer), inspect FOLDER."""
    out = tmp_path / "q"
    assert main(["quantize", str(builder_folder), "-o", str(out), "--calib-random", "2", "--seq-len", "16",
                 "--group-size", "32", "-q"]) == 0
    capsys.readouterr()
    for given in (builder_folder, builder_folder / "model.onnx", out):
        assert main(["eval", str(given), "--text", str(calib_text), "--seq-len", "32", "--max-tokens", "64"]) == 0, given
        assert "perplexity" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    assert "recipe fptq" in capsys.readouterr().out


def test_a_tokenizer_given_to_quantize_is_recorded_in_the_output(builder_folder, calib_text, tmp_path, capsys):
    """An optimum-style folder without tokenizer files, quantized with --tokenizer DIR: eval and generate on
    the output find that tokenizer without being told again."""
    folder = tmp_path / "bare"
    folder.mkdir()
    for item in builder_folder.iterdir():
        if item.name not in TOKENIZER_FILES + ("genai_config.json", "special_tokens_map.json"):
            shutil.copy2(item, folder / item.name)
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    for name in TOKENIZER_FILES + ("special_tokens_map.json",):
        if (builder_folder / name).is_file():
            shutil.copy2(builder_folder / name, tokenizer / name)
    out = tmp_path / "q"
    assert main(["quantize", str(folder), "-o", str(out), "--calib", str(calib_text), "--tokenizer", str(tokenizer),
                 "--seq-len", "16", "--calib-samples", "2", "--group-size", "32", "-q"]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", PROMPT, "--max-new-tokens", "2"]) == 0
    assert main(["eval", str(out / "model.onnx"), "--text", str(calib_text), "--seq-len", "32", "--max-tokens", "64"]) == 0


def test_links_in_the_input_folder_stay_valid_in_the_output(builder_folder, tmp_path, capsys):
    """A relative link inside a sub-folder that points outside the input folder dangled at the output's
    depth (copied as written): it is replaced by what it points at; a link to a file inside the folder
    stays a link, to the output's own file."""
    import os

    outside = tmp_path / "shared" / "notes.txt"
    outside.parent.mkdir()
    outside.write_text("kept")
    folder = tmp_path / "deep" / "in"
    shutil.copytree(builder_folder, folder)
    (folder / "extra").mkdir()
    os.symlink(os.path.relpath(outside, folder / "extra"), folder / "extra" / "notes.txt")
    os.symlink("../tokenizer.json", folder / "extra" / "tokenizer.json")
    os.symlink(os.path.relpath(outside, folder), folder / "top-notes.txt")
    out = tmp_path / "out"
    assert main(["quantize", str(folder), "-o", str(out), "--calib-random", "2", "--seq-len", "16",
                 "--group-size", "32", "--format", "ort", "-q"]) == 0
    for name in ("extra/notes.txt", "top-notes.txt"):
        assert not (out / name).is_symlink() and (out / name).read_text() == "kept", name
    link = out / "extra" / "tokenizer.json"
    assert link.is_symlink() and link.resolve() == (out / "tokenizer.json").resolve()


def test_a_folder_with_several_models_says_which_stay_float(builder_folder, tmp_path, capsys):
    """An optimum seq2seq-style folder (a decoder and an encoder): the run names every model and what was
    done to it; the one it does not quantize is copied float, with the reason, never silently."""
    import bad_models as B

    folder = tmp_path / "seq2seq"
    shutil.copytree(builder_folder, folder)
    (folder / "genai_config.json").unlink()
    B.save(B.float_input_model(), folder / "encoder_model.onnx")
    out = tmp_path / "out"
    assert main(["quantize", str(folder), "-o", str(out), "--calib-random", "2", "--seq-len", "16",
                 "--group-size", "32", "-q"]) == 0
    captured = capsys.readouterr()
    assert "warning: encoder_model.onnx: copied float, not quantized: only model.onnx is" in captured.err, captured.err
    assert "model.onnx quantized" in captured.out and "copied float: encoder_model.onnx" in captured.out, captured.out
    assert (out / "encoder_model.onnx").read_bytes() == (folder / "encoder_model.onnx").read_bytes()


def _full_folder(tmp_path, _src):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    return tmp_path / "full"


@pytest.mark.parametrize("make_out,needle", [
    (lambda t, src: src, "is the input folder"),
    (lambda t, src: src / "inside", "inside the input folder"),
    (_full_folder, "not empty"),
])
def test_output_folder_refusals(make_out, needle, builder_folder, tmp_path, capsys):
    out = make_out(tmp_path, builder_folder)
    before = sorted(p.name for p in builder_folder.iterdir())
    code = main(["quantize", str(builder_folder), "-o", str(out), "--calib-random", "2", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err.strip().splitlines()[-1], err
    assert sorted(p.name for p in builder_folder.iterdir()) == before
    assert not any(p.name.startswith(".fptq") for p in builder_folder.parent.iterdir())


def _first_logits(model_path, ids):
    """Logits of one prompt through our session on the CPU, with an empty past (the folder's own inputs)."""
    from fptq_graph.calibration import feeds_for
    from fptq_graph.ir.load import load_split
    from fptq_graph.runtime import session

    inputs = list(load_split(model_path).proto.graph.input)
    return session(model_path).run(["logits"], feeds_for(inputs, ids))[0].astype(np.float64)


@pytest.mark.parametrize("form", ["w4a8", "ort"])
def test_builder_cuda_folder_keeps_its_gpu_settings_and_runs_on_the_cpu(form, builder_cuda_folder, calib_text, tmp_path, capsys):
    """Issue 32's plumbing without a GPU: a builder `-e cuda -p fp16` folder (GroupQueryAttention over a
    shared past/present buffer) quantizes; the output keeps the CUDA provider and its options and the
    shared buffer, registers the op library (w4a8: every linear and the int8 head on our ops, which have
    CUDA kernels); the CPU provider runs it and computes what the qdq form of the same folder computes
    (the reference numerics of the same decisions). The output-SQNR step once failed on such a folder
    (ORT planned present into the past input's buffer once present was no graph output)."""
    outs = {}
    for name in (form, "qdq"):
        outs[name] = tmp_path / f"cuda-{name}"
        code = main(["quantize", str(builder_cuda_folder), "-o", str(outs[name]), "--calib", str(calib_text),
                     "--calib-samples", "4", "--seq-len", "32", "--group-size", "32", "--format", name, "-q"])
        assert code == 0, capsys.readouterr().err
    out = outs[form]
    before = json.loads((builder_cuda_folder / "genai_config.json").read_text())
    after = json.loads((out / "genai_config.json").read_text())
    options = after["model"]["decoder"]["session_options"]
    assert options["provider_options"] == before["model"]["decoder"]["session_options"]["provider_options"]
    assert "cuda" in options["provider_options"][0]
    assert after["search"] == before["search"] and after["search"]["past_present_share_buffer"] is True
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert "MatMul" not in ops - {"FusedMatMul"}, "a linear was left float"
    if form == "w4a8":
        assert options["custom_ops_library"] == "libfptq_ops.so" and (out / "libfptq_ops.so").is_file()
        assert {"W4A8MatMul", "W8A8MatMul"} <= ops
    ids = np.array([[1, 50, 300, 7, 900, 2000, 15, 8]], np.int64)
    ref, got = _first_logits(str(outs["qdq"] / "model.onnx"), ids), _first_logits(str(out / "model.onnx"), ids)
    cos = (ref * got).sum(-1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
    print(f"\n{form}: logits cosine to the qdq form of the same folder, lowest over the prompt {cos.min():.5f}")
    # fp16 activations: the forms round at different places (measured 0.9998-0.9999; a wrong product ~0)
    assert np.isfinite(got).all() and cos.min() > 0.999
    # onnxruntime-genai runs the folder as it is on the CPU provider (the config's CUDA provider cleared):
    # the same greedy tokens as our own generation
    assert genai_tokens(out, 12, providers=[]) == our_tokens(out, 12)


def test_eval_and_generate_take_a_provider_for_folders(builder_folder, heldout_text, capsys):
    """`--provider cuda` reaches the session for a folder as for a file: on a machine whose onnxruntime has
    no CUDA provider, both say so in one line (on the GPU machine they run: scripts/gpu)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the refusal is not reachable here")
    for argv in (["eval", str(builder_folder), "--text", str(heldout_text), "--seq-len", "16", "--max-tokens", "32"],
                 ["generate", str(builder_folder), "--prompt", PROMPT, "--max-new-tokens", "2"]):
        assert main(argv + ["--provider", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "has no CUDAExecutionProvider" in err and "onnxruntime-gpu" in err, err
    assert main(["eval", str(builder_folder), "--text", str(heldout_text), "--seq-len", "16", "--max-tokens", "32",
                 "--provider", "cpu"]) == 0
