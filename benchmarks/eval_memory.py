"""Peak memory of a perplexity eval of quantized models, with ONNX Runtime's memory pattern and without.

Each (model, setting) runs in a child process of its own: `fptq_graph.runtime.session(MODEL,
mem_pattern=...)` then `fptq_graph.evaluate.perplexity` over WINDOWS windows of TOKENS random tokens; the
parent reads the child's wall time and peak resident set size (os.wait4's ru_maxrss). Rounds interleave
the two settings (pattern, none, pattern, none, ...) so a noisy machine hits both alike.

    python benchmarks/eval_memory.py MODEL.onnx [MODEL.onnx ...] [--windows 2] [--tokens 512]
                                     [--rounds 1] [--json out.json]

Give models that differ in one thing to read a slope: two depths of the same width
(docs/benchmarks.md, "Eval": 7B-width fp16 LLaMAs of 2 and 4 layers, each form), so that the
difference per layer is what a deeper model adds. The vocabulary for the random tokens is read from
the model (calibration.vocab_size_of).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"ORT defaults": True, "no memory pattern": False}   # label -> session(mem_pattern=...)


def child(model: str, mem_pattern: bool, vocab: int, windows: int, tokens: int, out: str) -> None:
    import numpy as np

    from fptq_graph.evaluate import perplexity
    from fptq_graph.runtime import session

    ids = np.random.default_rng(0).integers(0, vocab, windows * tokens)
    start = time.perf_counter()
    value = perplexity(session(model, mem_pattern=mem_pattern), ids, tokens)
    Path(out).write_text(json.dumps({"seconds": round(time.perf_counter() - start, 1), "perplexity": value}))


def vocabulary(model: str) -> int:
    """Read in a process of its own: not in the measured child (it would hold the model beside its
    session), nor in the parent (a child's ru_maxrss starts from the parent's size at fork)."""
    code = ("import sys; from fptq_graph.calibration import vocab_size_of; from fptq_graph.ir.load import load_split; "
            "print(vocab_size_of(load_split(sys.argv[1]).proto))")
    printed = subprocess.run([sys.executable, "-c", code, model], capture_output=True, text=True, check=True).stdout.split()
    if not printed or not printed[-1].isdigit():
        raise SystemExit(f"{model}: cannot tell its vocabulary size for the random tokens")
    return int(printed[-1])


def measure(model: str, mem_pattern: bool, vocab: int, windows: int, tokens: int) -> dict:
    out = Path(f"/tmp/fptq-eval-memory-{os.getpid()}.json")
    out.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, __file__, "--child", model, str(int(mem_pattern)), str(vocab), str(windows),
                             str(tokens), str(out)])
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0 or not out.is_file():
        return {"error": f"exit status {status}"}
    info = json.loads(out.read_text())
    out.unlink()
    info["peak_rss_mib"] = round(usage.ru_maxrss / 1024)
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, pattern, vocab, windows, tokens, out = args.child
        child(model, pattern == "1", int(vocab), int(windows), int(tokens), out)
        return 0
    if not args.models:
        parser.error("give at least one MODEL.onnx")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from scale import machine

    vocabs = {model: vocabulary(model) for model in args.models}
    runs = []
    for round_ in range(args.rounds):
        for model in args.models:
            for label, pattern in SETTINGS.items():
                info = dict(model=Path(model).name, setting=label, round=round_ + 1, **measure(model, pattern, vocabs[model], args.windows, args.tokens))
                runs.append(info)
                print(json.dumps(info), flush=True)
    print(f"\n| model | setting | round | wall s | peak RSS MiB |\n|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['model']} | {r['setting']} | {r['round']} | {r.get('seconds', r.get('error'))} | {r.get('peak_rss_mib', '')} |")
    summary = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "load_average_after": [round(x, 2) for x in os.getloadavg()],
               "eval": f"{args.windows} windows of {args.tokens} random tokens", "runs": runs}
    print(f"\nload average after {summary['load_average_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
