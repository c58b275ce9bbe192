"""The `fptq-graph` command: export, quantize, inspect."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import FptqError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FptqError as exc:
        print(f"fptq-graph: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fptq-graph: interrupted; no output written", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    from .config import FORMATS, RECIPES, Config

    defaults = Config()
    parser = argparse.ArgumentParser(prog="fptq-graph", description="FPTQ W4A8 quantization for ONNX graphs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a Hugging Face model directory to ONNX (opset 21, dynamic batch/sequence)",
                       description="Export a Hugging Face model directory to ONNX through torch.export. The tokenizer "
                                   "is saved beside the ONNX as <name>.tokenizer/ and recorded in the model.")
    p.add_argument("model_dir", help="local Hugging Face model directory (config.json + weights), a .gguf file, "
                                     "or a packaged sample: 'minilm' (all-MiniLM-L6-v2) or 'smollm2' (SmolLM2-135M-Instruct)")
    p.add_argument("-o", "--output", required=True, help="output .onnx path")
    p.add_argument("--fx", action="store_true", help="also write the torch.export FX graph as <name>.fx.txt")
    p.add_argument("--kv-cache", action="store_true",
                   help="causal LMs: export past keys/values as inputs and presents as outputs (for generate)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("quantize", help="quantize a float ONNX model to W4A8 with FPTQ",
                       description="Quantize a float ONNX model to W4A8 (INT4 group-wise weights, int8 activations) "
                                   "with FPTQ's layer-wise activation strategy; writes the qdq form "
                                   "(standard ONNX) or, with --format w4a8, the bundled fptq::W4A8MatMul op.")
    p.add_argument("input", help="float ONNX model")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (written atomically)")
    calib = p.add_mutually_exclusive_group(required=True)
    calib.add_argument("--calib", metavar="FILE", help="calibration text file, tokenized with the model's tokenizer")
    calib.add_argument("--calib-random", metavar="N", type=int, help="N random-token sequences (data-free calibration)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the one recorded by export)")
    p.add_argument("--recipe", default=defaults.recipe, choices=RECIPES, help="default: fptq")
    p.add_argument("--format", default=defaults.format, choices=FORMATS,
                   help="qdq: standard ONNX QDQ, runs anywhere (default); w4a8: the bundled integer op "
                        "(load with fptq_graph.runtime.session or register fptq_graph.runtime.library_path()); "
                        "ort: ONNX Runtime's MatMulNBits weights, activations as in qdq")
    p.add_argument("--group-size", type=int, default=defaults.group_size, help="INT4 weight group along K (default %(default)s)")
    p.add_argument("--asymmetric", action="store_true", help="uint4 weights with zero points instead of symmetric int4")
    p.add_argument("--static-bound", type=float, default=defaults.static_bound, help="v <= this: per-tensor static (default %(default)s)")
    p.add_argument("--dynamic-bound", type=float, default=defaults.dynamic_bound, help="v > this: per-token dynamic (default %(default)s)")
    p.add_argument("--smooth-alpha", type=float, default=defaults.smooth_alpha, help="SmoothQuant alpha for smoothquant-w4a8 (default %(default)s)")
    p.add_argument("--gptq", action="store_true", help="GPTQ weights (error feedback through calibration X^T X) "
                                                        "instead of round-to-nearest")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="also quantize the LM head (the linear producing the model output 'logits'); "
                        "by default it stays float")
    p.add_argument("--sqnr-samples", type=int, default=defaults.sqnr_samples,
                   help="calibration sequences the per-layer output SQNR is measured on; 0 skips it (default %(default)s)")
    p.add_argument("--no-residual-compensation", action="store_true",
                   help="do not fold LAE into a norm that also feeds a residual; fall back to dynamic instead")
    p.add_argument("--calib-samples", type=int, default=defaults.calib_samples, help="calibration sequences (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=defaults.calib_seq_len, help="calibration sequence length (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=defaults.calib_batch_size, help="calibration batch size (default %(default)s)")
    p.add_argument("--report", metavar="R.json", help="write the per-layer report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or pass log")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("eval", help="perplexity of a causal LM (float or quantized) on a text file",
                       description="Perplexity through ONNX Runtime over non-overlapping windows of a text file, "
                                   "tokenized with the model's recorded tokenizer (or --tokenizer).")
    p.add_argument("model", help="ONNX causal LM with a 'logits' output")
    p.add_argument("--text", required=True, help="evaluation text (use held-out text calibration never saw)")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the one recorded by export)")
    p.add_argument("--json", metavar="OUT.json", help="also write the result as JSON")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("generate", help="greedy generation from a causal LM (float or quantized) in ONNX Runtime",
                       description="Greedy generation through ONNX Runtime with the fptq op library registered; "
                                   "new tokens are streamed to stdout, timings to stderr. Export with --kv-cache "
                                   "for one-token steps.")
    p.add_argument("model", help="ONNX causal LM with a 'logits' output")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=32, help="default %(default)s")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime execution provider")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the one recorded by export)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("inspect", help="print what the compiler decided for each layer of a model",
                       description="For a quantized model: the per-layer table (scheme, reason, activation max before "
                                   "and after LAE, weight SQNR) stored in it. For a float model: its quantizable linears.")
    p.add_argument("model", help="ONNX model")
    p.add_argument("--json", action="store_true", help="print the stored report as JSON")
    p.add_argument("--report", metavar="R.json", help="write the stored report as JSON")
    p.add_argument("--html", metavar="R.html", help="write a self-contained HTML page: table, plot, passes")
    p.add_argument("--plot", metavar="R.png", help="write the per-layer activation-max plot (log axis, bands shaded)")
    p.set_defaults(func=_cmd_inspect)
    return parser


def _cmd_export(args) -> int:
    from .exporters import export_hf
    from .exporters.packaged import PACKAGED, packaged_model

    source = packaged_model(args.model_dir) if args.model_dir in PACKAGED else args.model_dir
    model = export_hf(source, args.output, fx=args.fx, kv_cache=args.kv_cache)
    print(f"wrote {args.output} ({Path(args.output).stat().st_size / 2**20:.1f} MiB, "
          f"{len(model.graph.node)} nodes, opset {model.opset_import[0].version})")
    if args.fx:
        print(f"wrote {Path(args.output).with_suffix('.fx.txt')}")
    return 0


def _cmd_quantize(args) -> int:
    from .api import quantize
    from .config import Config

    config = Config(recipe=args.recipe, static_bound=args.static_bound, dynamic_bound=args.dynamic_bound,
                    group_size=args.group_size, symmetric=not args.asymmetric, format=args.format,
                    compensate_residual=not args.no_residual_compensation, smooth_alpha=args.smooth_alpha,
                    gptq=args.gptq, quantize_lm_head=args.quantize_lm_head, sqnr_samples=args.sqnr_samples,
                    calib_batch_size=args.batch_size,
                    calib_seq_len=args.seq_len, calib_samples=args.calib_samples, progress=not args.quiet)
    calibration = args.calib if args.calib is not None else args.calib_random
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr))
    result = quantize(args.input, calibration, config, tokenizer=args.tokenizer, log=log)
    result.save(args.output, args.report)
    if not args.quiet:
        print(result.table())
    size_in, size_out = Path(args.input).stat().st_size, Path(args.output).stat().st_size
    print(f"wrote {args.output}: {size_out / 2**20:.1f} MiB (input {size_in / 2**20:.1f} MiB)"
          + (f"; report {args.report}" if args.report else ""))
    return 0


def _cmd_eval(args) -> int:
    from .calibration import load_tokenizer, read_token_ids
    from .evaluate import perplexity
    from .model_io import load_model, write_atomic
    from .runtime import session

    model = load_model(args.model)
    outputs = [o.name for o in model.graph.output]
    if "logits" not in outputs:
        raise FptqError(f"{args.model}: no 'logits' output (outputs: {', '.join(outputs)}); "
                        "eval measures the perplexity of causal LMs")
    ids = read_token_ids(args.text, lambda: load_tokenizer(args.tokenizer, model, args.model), role="evaluation text")
    sess = session(args.model)
    used = min(ids.size, args.max_tokens or ids.size)
    value = perplexity(sess, ids, args.seq_len, max_tokens=args.max_tokens, progress=True)
    result = {"model": args.model, "text": args.text, "seq_len": args.seq_len,
              "tokens_evaluated": (used // args.seq_len) * args.seq_len, "perplexity": value}
    print(f"{args.model}: perplexity {value:.4f} over {result['tokens_evaluated']} tokens "
          f"({used // args.seq_len} windows of {args.seq_len})")
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=2))
    return 0


def _cmd_generate(args) -> int:
    from .calibration import load_tokenizer, tokenize_text
    from .generate import greedy_generate
    from .model_io import load_split
    from .runtime import PROVIDERS, session

    header = load_split(args.model).proto   # metadata only (the tokenizer link); one-line errors for a bad file
    tokenizer = load_tokenizer(args.tokenizer, header, args.model)
    del header
    sess = session(args.model, providers=PROVIDERS[args.provider])
    prompt = tokenize_text(tokenizer, args.prompt)
    print(args.prompt, end="", flush=True)
    shown = ""
    generated: list[int] = []

    def stream(token: int) -> None:
        nonlocal shown
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        print(text[len(shown):], end="", flush=True)   # decode the whole tail: tokens can merge
        shown = text

    result = greedy_generate(sess, prompt, args.max_new_tokens, tokenizer.eos_token_id, stream)
    print()
    print(f"[{args.provider}] prompt {result.prompt_tokens} tokens: first token in {result.prefill_seconds * 1e3:.1f} ms; "
          f"{len(result.decode_seconds)} more at {result.decode_tokens_per_second:.1f} tokens/s", file=sys.stderr)
    return 0


def _cmd_inspect(args) -> int:
    from .model_io import get_metadata, load_model
    from .report import REPORT_KEY, format_table

    model = load_model(args.model)
    stored = get_metadata(model, REPORT_KEY)
    if stored is None:
        if args.report or args.html or args.plot:
            raise FptqError(f"{args.model}: not quantized by fptq-graph, so there is no report to write "
                            "(--report/--html/--plot need a model written by 'fptq-graph quantize')")
        return _inspect_float(model, args)
    report = json.loads(stored)
    _write_inspect_files(report, args)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    cfg = report["config"]
    print(f"{args.model}: recipe {cfg['recipe']}, group {cfg['group_size']}, bounds {cfg['static_bound']:g}/"
          f"{cfg['dynamic_bound']:g}, calibration {report['calibration']}")
    for p in report["passes"]:
        print(f"  [{p['name']}] {p['summary']}")
    print(format_table(report["layers"]))
    for kept in report.get("kept_float", []):
        print(f"  kept float: {kept['name']} (K={kept['K']} N={kept['N']}): {kept['reason']}")
    return 0


def _write_inspect_files(report: dict, args) -> None:
    from .model_io import write_atomic
    from .report import to_json

    if args.report:
        write_atomic(args.report, to_json(report))
    if args.plot:
        from .report_plot import activation_png

        write_atomic(args.plot, activation_png(report))
    if args.html:
        from .report_html import report_html

        write_atomic(args.html, report_html(report, Path(args.model).name))
    for path in (args.report, args.plot, args.html):
        if path:
            print(f"wrote {path}", file=sys.stderr)


def _inspect_float(model, args) -> int:
    import onnx_graphsurgeon as gs

    from .config import Config
    from .passes import FindQuantizableLinears
    from .state import State

    state = State(graph=gs.import_onnx(model), config=Config())
    summary = FindQuantizableLinears().run(state)
    print(f"{args.model}: not quantized by fptq-graph; {summary}")
    for linear in state.linears.values():
        producer = f"{linear.producer.kind} '{linear.producer.node.name}'" if linear.producer else "none"
        print(f"  {linear.name}  K={linear.k} N={linear.n}  producer: {producer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
