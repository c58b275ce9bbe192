"""The `fptq-graph` command: export, quantize, inspect."""
from __future__ import annotations

import argparse
import functools
import json
import sys
import warnings
from pathlib import Path

from fptq_graph.errors import FptqError
from fptq_graph.files.run_outputs import RunOutputs, Terminated, mib_on_disk, model_files, outputs_reading, signals


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--recipe" in argv[:-2] and argv[argv.index("--recipe") + 1] == "show":   # --recipe show NAME: print, exit
        return _show_recipe(argv[argv.index("--recipe") + 2])
    parser = _parser()
    args = parser.parse_args(argv)
    args.typed = _typed(argv)
    args.debug = args.debug or args.debug_before_command
    try:
        with signals(), warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.func(args)
    except FptqError as exc:
        return _fail(str(exc))
    except Terminated as exc:
        print(f"fptq-graph: stopped by {exc}; no output written", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("fptq-graph: interrupted; no output written", file=sys.stderr)
        return 130
    except OSError as exc:   # a full disk, a vanished folder, a permission the early checks could not see
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}; no output written")
    except MemoryError:
        if args.debug:
            raise
        return _fail("out of memory; lower --batch-size or --seq-len (calibration memory grows with both); "
                     "no output written")
    except Exception as exc:  # a bug or an input we did not foresee: one line, the traceback on request
        if args.debug:
            raise
        detail = str(exc).strip().splitlines()
        return _fail(f"unexpected {type(exc).__name__}: {detail[0] if detail else 'no message'} "
                     "(run again with --debug for the traceback, and please report it); no output written")


def _show_recipe(spec: str) -> int:
    from fptq_graph.recipes import RecipeError, recipe_row, to_toml

    try:
        print(to_toml(recipe_row(spec)), end="")
    except RecipeError as exc:
        return _fail(str(exc))
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Our warnings as one line each; other libraries' warnings keep their usual form."""
    if issubclass(category, UserWarning) and category.__module__.startswith("fptq_graph"):
        print(f"fptq-graph: warning: {message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line), end="", file=sys.stderr)


def _fail(message: str) -> int:
    print(f"fptq-graph: error: {message}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    from fptq_graph.config import FORMATS, RECIPES, Config
    from fptq_graph.recipes import ROTATIONS, WEIGHT_QUANTIZERS, RecipeAction

    defaults = Config()
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="print the Python traceback of an unexpected error")
    parser = argparse.ArgumentParser(prog="fptq-graph", description="FPTQ W4A8 quantization for ONNX graphs.")
    # Before the sub-command (where --help shows it) under a name of its own: argparse copies the
    # sub-command's namespace over the top level's, so one shared name lost the earlier --debug.
    parser.add_argument("--debug", dest="debug_before_command", action="store_true",
                        help="print the Python traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", parents=[common], help="export a Hugging Face model directory to ONNX (opset 21, dynamic batch/sequence)",
                       description="Export a Hugging Face model directory to ONNX through torch.export. The tokenizer "
                                   "is saved beside the ONNX as <name>.tokenizer/ and recorded in the model.")
    p.add_argument("model_dir", help="local Hugging Face model directory (config.json + weights), a .gguf file, "
                                     "or a packaged sample: 'minilm' (all-MiniLM-L6-v2) or 'smollm2' (SmolLM2-135M-Instruct)")
    p.add_argument("-o", "--output", required=True, help="output .onnx path")
    p.add_argument("--fx", action="store_true", help="also write the torch.export FX graph as <name>.fx.txt")
    p.add_argument("--kv-cache", action="store_true",
                   help="causal LMs: export past keys/values as inputs and presents as outputs (for generate)")
    p.add_argument("--dtype", choices=("auto", "float32", "float16"), default="auto",
                   help="weights and compute type of the graph; auto: float16 for a float16 or bfloat16 "
                        "safetensors checkpoint (bfloat16 converted), float32 otherwise (default %(default)s)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("quantize", parents=[common], help="quantize a float ONNX model to W4A8 with FPTQ",
                       description="Quantize a float ONNX model to W4A8 (INT4 group-wise weights, int8 activations) "
                                   "with FPTQ's layer-wise activation strategy; writes the qdq form "
                                   "(standard ONNX) or, with --format w4a8, the bundled fptq::W4A8MatMul op.")
    p.add_argument("input", help="float ONNX model, or a model folder (ONNX Runtime GenAI, optimum or Hugging Face): "
                                 "then -o names a new folder holding everything the input held, the model quantized")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (written atomically)")
    calib = p.add_mutually_exclusive_group(required=True)
    calib.add_argument("--calib", metavar="FILE", help="calibration text file, tokenized with the model's tokenizer; "
                                                       "or a .npz of feeds (one array per model input, samples first)")
    calib.add_argument("--calib-random", metavar="N", type=int,
                       help="N random samples (data-free calibration): random tokens for a language model, values of "
                            "each input's type and shape for other models")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the one recorded by export)")
    p.add_argument("--recipe", default=defaults.recipe, action=RecipeAction, metavar="{" + ",".join(RECIPES) + "} | FILE.toml",
                   help="default: fptq; a .toml file holds a recipe of your own; 'list' prints every recipe's row "
                        "(classifier, equalizer, AWQ, weights) and exits; 'show NAME' prints one as TOML and exits")
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
    p.add_argument("--weight-quantizer", choices=WEIGHT_QUANTIZERS, default=None,
                   help="INT4 weight quantizer: rtn (max-abs scales), clip (each group's clipping ratio searched "
                        "against diag(X^T X)-weighted error), gptq, gptq-clip (GPTQ on clipped scales); "
                        "default: the recipe's (--recipe list)")
    p.add_argument("--rotate", choices=ROTATIONS, default=None,
                   help="rotate the residual stream first: hadamard (a randomized Hadamard matrix folded into the "
                        "weights, the same function in float; pre-norm decoders, the reason reported where it cannot) "
                        "or none; default: the recipe's (fptq-rot rotates)")
    p.add_argument("--rotate-seed", type=int, default=0, help="seed of the rotation's random signs (default %(default)s; "
                                                               "recorded in the report)")
    p.add_argument("--rotate-ffn", action="store_true",
                   help="with a rotation, also rotate each FFN down projection's input at run time (an explicit op "
                        "in the graph, a few percent of the down projection's cost; docs/accuracy.md)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize rows by decreasing diag(X^T X)")
    p.add_argument("--ort-accuracy-level", type=int, choices=(0, 4), default=defaults.ort_accuracy_level,
                   help="--format ort: MatMulNBits accuracy_level; 0 computes what the graph says (default), "
                        "4 lets ONNX Runtime's CPU kernel quantize each input to int8 per block of K itself "
                        "(no activation QDQ in the graph; faster decode)")
    p.add_argument("--lm-head", choices=("float", "int8", "int4"), default=None,
                   help="the LM head (the linear producing the model output 'logits'): float, int8 per output "
                        "channel (a tied embedding table is then stored once, quantized) or INT4 like the other "
                        f"linears (default {defaults.lm_head})")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="the older switch: the same as --lm-head int4")
    p.add_argument("--embedding", choices=("float", "int8", "int4"), default=None,
                   help="untied embedding tables (a lookup's own table): float, int8 with one scale per row, or "
                        "INT4 groups along the row (default: as the LM head)")
    p.add_argument("--sqnr-samples", type=int, default=defaults.sqnr_samples,
                   help="calibration sequences the per-layer output SQNR is measured on; 0 skips it (default %(default)s)")
    p.add_argument("--no-residual-compensation", action="store_true",
                   help="do not fold LAE into a norm that also feeds a residual; fall back to dynamic instead")
    p.add_argument("--calib-samples", type=int, default=defaults.calib_samples, help="calibration sequences (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=defaults.calib_seq_len, help="calibration sequence length (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=defaults.calib_batch_size, help="calibration batch size (default %(default)s)")
    p.add_argument("--report", metavar="R.json", help="write the per-layer report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or pass log")
    big = p.add_argument_group("large models", "block by block: one transformer block's weights, statistics and "
                               "activations in memory at a time (chosen automatically when the whole graph would not "
                               "fit, or would have to trade AWQ/GPTQ for memory)")
    big.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                     help="force (--sequential) or refuse (--no-sequential) the block-by-block run (default: decided "
                          "from the memory budget, and said)")
    big.add_argument("--memory-budget", type=int, metavar="MIB", default=None,
                     help="memory the whole-graph run may take before the run goes block by block (default: 60%% of "
                          "the memory available)")
    big.add_argument("--block-inputs", choices=("float", "quantized"), default=defaults.block_inputs,
                     help="block by block: calibrate each block on the float model's activations, or on what the "
                          "already quantized blocks before it give (default %(default)s)")
    big.add_argument("--resume", action="store_true",
                     help="continue a stopped run from its work folder (same arguments): block by block from the first "
                          "unfinished block; a whole-graph run (one block) from lowering if its block was saved")
    big.add_argument("--work-dir", metavar="DIR", default=None,
                     help="the run's work folder of finished blocks (default: .<output name>.fptq-work beside the output; "
                          "removed once the output is written)")
    big.add_argument("--workers", type=int, metavar="N", default=None,
                     help="calibrate each block (the whole graph: its one block) on N Ray worker processes (a local Ray "
                          "cluster for the run; needs "
                          "pip install fptq-graph[distributed])")
    big.add_argument("--ray-address", metavar="ADDR", default=None,
                     help="calibrate on an existing Ray cluster (ray start --head; 'auto' finds the local one)")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("eval", parents=[common], help="perplexity of a causal LM (float or quantized) on a text file",
                       description="Perplexity through ONNX Runtime over non-overlapping windows of a text file, "
                                   "tokenized with the model's recorded tokenizer (or --tokenizer).")
    p.add_argument("model", help="ONNX causal LM with a 'logits' output, or a model folder (its tokenizer beside it)")
    p.add_argument("--text", required=True, help="evaluation text (use held-out text calibration never saw)")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the one recorded by export)")
    p.add_argument("--json", metavar="OUT.json", help="also write the result as JSON")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime execution provider")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("generate", parents=[common], help="greedy generation from a causal LM (float or quantized) in ONNX Runtime",
                       description="Greedy generation through ONNX Runtime with the fptq op library registered; "
                                   "new tokens are streamed to stdout, timings to stderr. Export with --kv-cache "
                                   "for one-token steps.")
    p.add_argument("model", help="ONNX causal LM with a 'logits' output, or a model folder (its tokenizer beside it)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=32, help="default %(default)s")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime execution provider")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the one recorded by export)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("inspect", parents=[common], help="print what the compiler decided for each layer of a model",
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
    from fptq_graph.exporters import export_hf, export_hf_streaming
    from fptq_graph.exporters.packaged import PACKAGED, packaged_model

    source = packaged_model(args.model_dir) if args.model_dir in PACKAGED else args.model_dir
    outputs = RunOutputs()
    outputs.add_input(source)
    target = Path(args.output)
    out = outputs.add(target, "-o", companions=(target.name + ".data",) + ((target.stem + ".fx.txt",) if args.fx else ()),
                      folders=(target.stem + ".tokenizer",))
    # A model directory streams its safetensors weights one tensor at a time (exporters/streaming.py, which
    # hands GGUF files and other checkpoints to export_hf); the small packaged samples keep export_hf's one
    # self-contained file unless float16 is asked.
    stream = args.dtype == "float16" or (args.model_dir not in PACKAGED and Path(source).is_dir())
    with outputs:
        if stream:
            model = export_hf_streaming(source, out.staged, dtype=args.dtype, fx=args.fx, kv_cache=args.kv_cache,
                                        log=lambda line: print(line, file=sys.stderr))
        else:
            model = export_hf(source, out.staged, fx=args.fx, kv_cache=args.kv_cache)
    print(f"wrote {args.output} ({mib_on_disk(model_files(args.output)):.1f} MiB, "
          f"{len(model.graph.node)} nodes, opset {model.opset_import[0].version})")
    if args.fx:
        print(f"wrote {target.with_suffix('.fx.txt')}")
    return 0


# Config fields whose flag's argparse name is another (the others are named alike).
CONFIG_FLAGS = {"symmetric": "asymmetric", "compensate_residual": "no_residual_compensation", "calib_batch_size": "batch_size",
                "calib_seq_len": "seq_len", "memory_budget_mib": "memory_budget", "progress": "quiet"}


def _typed(argv: list[str]) -> set[str]:
    """The argparse names of the options `argv` gives (parsed again with every default suppressed)."""
    parser = _parser()
    parsers = [parser]
    while parsers:
        p = parsers.pop()
        p.set_defaults(**{key: argparse.SUPPRESS for key in p._defaults})
        for action in p._actions:
            action.default = argparse.SUPPRESS
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    return set(vars(parser.parse_args(argv)))


def _cmd_quantize(args) -> int:
    """Arguments to Config, then the one quantize flow (quantize_to.py); prints what it wrote."""
    from fptq_graph.config import Config
    from fptq_graph.quantize_to import quantize_to

    if args.quantize_lm_head and args.lm_head not in (None, "int4"):
        raise FptqError(f"--quantize-lm-head (the older switch for --lm-head int4) contradicts --lm-head {args.lm_head}; "
                        "give one of them")
    values = dict(recipe=args.recipe, static_bound=args.static_bound, dynamic_bound=args.dynamic_bound,
                  group_size=args.group_size, symmetric=not args.asymmetric, format=args.format,
                  compensate_residual=not args.no_residual_compensation, smooth_alpha=args.smooth_alpha,
                  gptq=args.gptq, weight_quantizer=args.weight_quantizer, rotate=args.rotate,
                  rotate_seed=args.rotate_seed, rotate_ffn=args.rotate_ffn, act_order=args.act_order,
                  ort_accuracy_level=args.ort_accuracy_level, lm_head=args.lm_head,
                  quantize_lm_head=args.quantize_lm_head, embedding=args.embedding, sqnr_samples=args.sqnr_samples,
                  calib_batch_size=args.batch_size, calib_seq_len=args.seq_len, calib_samples=args.calib_samples,
                  progress=not args.quiet, sequential=args.sequential, memory_budget_mib=args.memory_budget,
                  block_inputs=args.block_inputs)
    # Only what the command line says: a TOML recipe's [options] fill in the rest (Config.given).
    config = Config(**{field: value for field, value in values.items() if CONFIG_FLAGS.get(field, field) in args.typed})
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr))
    written = quantize_to(args.input, args.output, args.calib if args.calib is not None else args.calib_random, config,
                          tokenizer=args.tokenizer, report=args.report, log=log, work_dir=args.work_dir,
                          resume=args.resume, workers=args.workers, ray_address=args.ray_address)
    if not args.quiet:
        for name, result in written.results.items():
            print(f"{name}:\n{result.table()}" if len(written.results) > 1 else result.table())
    print(written.line)
    return 0


def _model_of_folder(args) -> None:
    """eval, generate and inspect take what quantize takes: a model folder (GenAI builder, optimum, or a
    Hugging Face folder holding an ONNX model) stands for its model, with the tokenizer beside it."""
    if not Path(args.model).is_dir():
        return
    from fptq_graph.ir.folder import open_folder

    folder = open_folder(args.model)
    if folder.model is None:
        raise FptqError(f"{args.model}: a Hugging Face folder without an ONNX model; quantize or export it first")
    args.model = str(folder.model)
    if hasattr(args, "tokenizer"):
        args.tokenizer = args.tokenizer or (str(folder.tokenizer) if folder.tokenizer else None)


def _cmd_eval(args) -> int:
    from fptq_graph.calibration import check_token_ids, leading_bos, load_tokenizer, read_token_ids, vocab_size_of
    from fptq_graph.evaluate import perplexity
    from fptq_graph.ir.load import load_split
    from fptq_graph.ir.save import write_atomic
    from fptq_graph.runtime.sessions import PROVIDERS, session

    if args.seq_len < 2:
        raise FptqError(f"--seq-len must be at least 2 (a window predicts its tokens after the first), got {args.seq_len}")
    if args.max_tokens is not None and args.max_tokens < args.seq_len:
        raise FptqError(f"--max-tokens must be at least one window (--seq-len {args.seq_len}), got {args.max_tokens}")
    _model_of_folder(args)
    outputs = outputs_reading(args.model, args.text, args.tokenizer)
    json_out = outputs.add(args.json, "--json") if args.json is not None else None
    with outputs:
        # The structure only (weights stay mapped in the file, as generate does): a whole loaded 7B
        # beside its session doubled the weights in memory. KV cache sizes the loader filled in are kept.
        header = load_split(args.model).proto
        names = [o.name for o in header.graph.output]
        if "logits" not in names:
            raise FptqError(f"{args.model}: no 'logits' output (outputs: {', '.join(names)}); "
                            "eval measures the perplexity of causal LMs")
        get_tokenizer = functools.cache(lambda: load_tokenizer(args.tokenizer, header, args.model))
        ids = read_token_ids(args.text, get_tokenizer, role="evaluation text")
        check_token_ids(ids, vocab_size_of(header), args.text, args.model)
        bos = leading_bos(get_tokenizer())
        inputs = list(header.graph.input)
        del header
        # see session(): the qdq form's memory pattern
        sess = session(args.model, providers=PROVIDERS[args.provider], mem_pattern=False)
        used = min(ids.size, args.max_tokens or ids.size)
        value = perplexity(sess, ids, args.seq_len, max_tokens=args.max_tokens, progress=True, bos=bos,
                           inputs=inputs)
        windows = used // (args.seq_len - (bos is not None))
        result = {"model": args.model, "text": args.text, "provider": args.provider, "seq_len": args.seq_len, "bos": bos,
                  "tokens_scored": windows * (args.seq_len - 1), "windows": windows, "perplexity": value}
        if json_out:
            write_atomic(json_out.staged, json.dumps(result, indent=2))
    print(f"{args.model}: perplexity {value:.4f} over {result['tokens_scored']} predicted tokens "
          f"({windows} windows of {args.seq_len}{f', each starting with BOS {bos}' if bos is not None else ''})")
    return 0


def _cmd_generate(args) -> int:
    from fptq_graph.calibration import leading_bos, load_tokenizer, tokenize_text
    from fptq_graph.generate import greedy_generate
    from fptq_graph.ir.load import load_split
    from fptq_graph.runtime.sessions import PROVIDERS, session

    _model_of_folder(args)
    # The structure only: the tokenizer link, and the inputs with any KV cache sizes the loader filled in;
    # one-line errors for a bad file.
    header = load_split(args.model).proto
    tokenizer = load_tokenizer(args.tokenizer, header, args.model)
    inputs = list(header.graph.input)
    del header
    sess = session(args.model, providers=PROVIDERS[args.provider])
    bos = leading_bos(tokenizer)
    prompt = ([bos] if bos is not None else []) + tokenize_text(tokenizer, args.prompt)
    print(args.prompt, end="", flush=True)
    shown = ""
    generated: list[int] = []

    def stream(token: int) -> None:
        nonlocal shown
        generated.append(token)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        print(text[len(shown):], end="", flush=True)   # decode the whole tail: tokens can merge
        shown = text

    result = greedy_generate(sess, prompt, args.max_new_tokens, tokenizer.eos_token_id, stream, inputs=inputs)
    print()
    print(f"[{args.provider}] prompt {result.prompt_tokens} tokens: first token in {result.prefill_seconds * 1e3:.1f} ms; "
          f"{len(result.decode_seconds)} more at {result.decode_tokens_per_second:.1f} tokens/s", file=sys.stderr)
    return 0


def _cmd_inspect(args) -> int:
    from fptq_graph.ir.load import load_model
    from fptq_graph.ir.metadata import get_metadata
    from fptq_graph.report.layers import REPORT_KEY, format_table, parse_stored
    from fptq_graph.report.rotation import rotation_lines

    _model_of_folder(args)
    outputs = outputs_reading(args.model)
    planned = {flag: outputs.add(path, flag) for flag, path in
               (("--report", args.report), ("--html", args.html), ("--plot", args.plot)) if path is not None}
    with outputs:
        model = load_model(args.model)
        stored = get_metadata(model, REPORT_KEY)
        if stored is None:
            if planned:
                raise FptqError(f"{args.model}: not quantized by fptq-graph, so there is no report to write "
                                "(--report/--html/--plot need a model written by 'fptq-graph quantize')")
            return _inspect_float(model, args)
        report = parse_stored(stored, args.model)
        _write_inspect_files(report, planned, args.model)
    for out in planned.values():
        print(f"wrote {out.final}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    cfg = report["config"]
    print(f"{args.model}: recipe {cfg['recipe']}, group {cfg['group_size']}, bounds {float(cfg['static_bound']):g}/"
          f"{float(cfg['dynamic_bound']):g}, calibration {report['calibration']}")
    for p in report["passes"]:
        print(f"  [{p['name']}] {p['summary']}")
    print(format_table(report["layers"]))
    for line in rotation_lines(report.get("rotation", {})):
        print(line)
    for kept in report.get("kept_float", []):
        print(f"  kept float: {kept['name']} (K={kept['K']} N={kept['N']}): {kept['reason']}")
    for table in report.get("embeddings", []):
        if table.get("mode") == "float":
            print(f"  embedding {table['table']}: kept float: {table['note']}")
        else:
            sqnr = "exact" if table.get("sqnr_db") is None else f"SQNR {table['sqnr_db']:.1f} dB"
            print(f"  embedding {table['table']} {'x'.join(map(str, table['shape']))}: {table['note']}, "
                  f"{table['float_bytes'] / 2**20:.2f} -> {table['bytes'] / 2**20:.2f} MiB, {sqnr}")
    return 0


def _write_inspect_files(report: dict, planned: dict, model_path: str) -> None:
    from fptq_graph.ir.save import write_atomic
    from fptq_graph.report.layers import to_json

    if "--report" in planned:
        write_atomic(planned["--report"].staged, to_json(report))
    if "--plot" in planned:
        from fptq_graph.report.plot import activation_png

        write_atomic(planned["--plot"].staged, activation_png(report))
    if "--html" in planned:
        from fptq_graph.report.html import report_html

        write_atomic(planned["--html"].staged, report_html(report, Path(model_path).name))


def _inspect_float(model, args) -> int:
    import onnx_graphsurgeon as gs

    from fptq_graph.config import Config
    from fptq_graph.passes import FindQuantizableLinears
    from fptq_graph.passes.state import State

    state = State(graph=gs.import_onnx(model), config=Config())
    result = FindQuantizableLinears().run(state)
    print(f"{args.model}: not quantized by fptq-graph; {result.summary}")
    for linear in state.linears.values():
        producer = f"{linear.producer.kind} '{linear.producer.node.name}'" if linear.producer else "none"
        print(f"  {linear.name}  K={linear.k} N={linear.n}  producer: {producer}")
    return 0
