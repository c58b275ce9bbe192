"""`fptq-graph inspect` outputs: the report's output SQNR against a numpy reference, the JSON, the plot
(checked on its plotting data and decoded), and the HTML page rendered in headless Chromium."""
import json
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from PIL import Image

import crafted as C
from fptq_graph import Config, quantize
from fptq_graph.cli import main
from fptq_graph.report.plot import activation_figure, plot_data


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The crafted LN block with the LN in the LAE band: static, lae and dynamic layers all appear."""
    rng = np.random.default_rng(21)
    model, w = C.ln_block(30.0, rng, u_scale=0.5)
    calib = C.feeds(rng, 2)
    result = quantize(model, calib, Config(recipe="fptq-paper", group_size=32, sqnr_samples=3, progress=False))
    path = tmp_path_factory.mktemp("inspect") / "q.onnx"
    result.save(path)
    return path, result, w, calib


def test_output_sqnr_equals_a_numpy_reference(quantized):
    path, result, w, calib = quantized
    rows = {r["name"]: r for r in result.layers}
    assert {r["scheme"] for r in result.layers} >= {"lae", "dynamic"}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}
    # The first 3 samples (rows) of the calibration batches: lin_c reads a plain input, so its quantized
    # output is static int8 activations times INT4 weights, and the float one is u @ W4.
    first = calib[0]
    u = first["u"][:2], calib[1]["u"][:1]
    us = np.concatenate(u) * w["u_scale"]
    ref = us.astype(np.float64) @ w["W4"]
    q = C.fake_quant_static(us, float(inits["lin_c.act_scale"])) @ C.ref_int4(w["W4"], 32)
    expected = 10 * np.log10(np.sum(ref ** 2) / np.sum((ref - q) ** 2))
    assert rows["lin_c"]["output_sqnr_db"] == pytest.approx(expected, abs=0.02)
    assert all(r["output_sqnr_db"] is not None and 5 < r["output_sqnr_db"] < 60 for r in result.layers)


def test_sqnr_can_be_skipped():
    rng = np.random.default_rng(2)
    model, _ = C.ln_block(1.0, rng)
    result = quantize(model, C.feeds(rng, 1), Config(recipe="fptq-paper", sqnr_samples=0, progress=False))
    assert all(r["output_sqnr_db"] is None for r in result.layers)


def test_inspect_writes_report_plot_and_html(quantized, tmp_path, capsys):
    path, result, _, _ = quantized
    report, plot, page = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "r.html"
    assert main(["inspect", str(path), "--report", str(report), "--plot", str(plot), "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert "out SQNR dB" in out and "lin_a" in out
    data = json.loads(report.read_text())
    assert [l["name"] for l in data["layers"]] == [l["name"] for l in result.layers]
    image = Image.open(plot)
    image.load()
    assert image.size[0] >= 600 and image.size[1] >= 300
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50   # not blank: points, bands, text
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and 'src="data:image/png;base64,' in text
    assert "http://" not in text and "https://" not in text       # self-contained


def test_plot_shows_both_bands_and_every_layer(quantized):
    _, result, _, _ = quantized
    report = result.report()
    data = plot_data(report)
    assert data["bounds"] == (15.0, 150.0)
    ax = activation_figure(report).axes[0]
    assert ax.get_yscale() == "log"
    lines = {line.get_gid(): line.get_ydata() for line in ax.get_lines()}
    assert list(lines["bound-static"]) == [15.0, 15.0] and list(lines["bound-dynamic"]) == [150.0, 150.0]
    spans = {p.get_gid(): p for p in ax.patches}
    band = spans["band-lae"]   # axhspan: a rectangle spanning the axes' width, y in data units
    assert (band.get_y(), band.get_y() + band.get_height()) == pytest.approx((15.0, 150.0))
    band = spans["band-dynamic"]
    assert band.get_y() == pytest.approx(150.0) and band.get_y() + band.get_height() > 150.0
    before = next(c for c in ax.collections if c.get_gid() == "act-max-before")
    np.testing.assert_allclose(before.get_offsets()[:, 1], [l["act_max_before"] for l in result.layers])
    after = next(c for c in ax.collections if c.get_gid() == "act-max-after")
    assert len(after.get_offsets()) == sum(l["scheme"] == "lae" for l in result.layers)
    # a config with other bounds moves the lines
    report["config"] = dict(report["config"], static_bound=4.0, dynamic_bound=40.0)
    ax = activation_figure(report).axes[0]
    assert {l.get_gid(): l.get_ydata()[0] for l in ax.get_lines()} == {"bound-static": 4.0, "bound-dynamic": 40.0}


def test_html_renders_in_headless_chromium(quantized, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "chromium not found: scripts/setup.sh installs Debian's chromium package for this test"
    path, result, _, _ = quantized
    page = tmp_path / "r.html"
    assert main(["inspect", str(path), "--html", str(page)]) == 0
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1600"]
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=120)
    image = Image.open(shot).convert("RGB")
    colors = image.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 100, "screenshot is blank"
    dominant = max(colors)[0] / (image.size[0] * image.size[1])
    assert dominant < 0.97, f"screenshot is {dominant:.1%} one color"
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    table = dom[dom.index('<table id="layers"'):]
    table = table[:table.index("</table>")]
    for layer in result.layers:
        assert f">{layer['name']}<" in table, layer["name"]
    assert table.count("<tr>") == len(result.layers) + 1


def test_inspect_files_need_a_quantized_model(tmp_path, capsys):
    rng = np.random.default_rng(4)
    model, _ = C.ln_block(1.0, rng)
    src = C.save(model, tmp_path / "float.onnx")
    code = main(["inspect", src, "--html", str(tmp_path / "r.html")])
    err = capsys.readouterr().err
    assert code == 2 and "not quantized by fptq-graph" in err and not (tmp_path / "r.html").exists()
