"""`--workers N` against one process: the wall time and the output of a block-by-block quantize of the
same model, in interleaved rounds (one process, N workers, one process, ...), each run in a process of
its own.

Ray spreads each block's calibration batches over the workers and then the block's weight quantizer
calls (GPTQ, the clipping search) as tasks; the driver sums and takes results in order, so the output
must be the one-process output byte for byte (its graph fingerprint is compared). On a machine with
as many cores as workers no speedup is possible (the driver's numpy and ONNX Runtime already use the
cores); the ratio then measures Ray's overhead.

    python benchmarks/workers.py MODEL.onnx [--workers 2] [--rounds 2] [--samples 16] [--json out.json]

Peak RSS is the driver's own (wait4 of the child); Ray's worker processes are not its children and
are not counted. Use enough samples for every worker to get a batch (samples / batch >= workers).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALIB_TOKENS, CALIB_BATCH = 256, 8


def child(model: str, workers: int, samples: int, out: str) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import fptq_graph as fq
    from fingerprints import graph_fingerprint

    config = fq.Config(calib_samples=samples, calib_seq_len=CALIB_TOKENS, calib_batch_size=CALIB_BATCH,
                       sqnr_samples=0, progress=False, sequential=True)
    start = time.perf_counter()
    result = fq.quantize(model, samples, config, workers=workers or None)
    seconds = time.perf_counter() - start
    blocks = result.run["blocks"]
    info = {"seconds": round(seconds, 1), "fingerprint": graph_fingerprint(result.model),
            "weight_tasks": result.run.get("weight_tasks", 0), "blocks": len(blocks),
            "block_seconds": [b["seconds"] for b in blocks]}
    result.discard_work()
    Path(out).write_text(json.dumps(info))


def measure(model: str, workers: int, samples: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="fptq-workers-") as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.Popen([sys.executable, __file__, "--child", model, str(workers), str(samples), str(out)])
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0 or not out.is_file():
            return {"error": f"exit status {status}"}
        info = json.loads(out.read_text())
        info["driver_peak_rss_mib"] = round(usage.ru_maxrss / 1024)
        return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences of 256 random tokens, batch 8")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, workers, samples, out = args.child
        child(model, int(workers), int(samples), out)
        return 0
    if not args.model:
        parser.error("MODEL.onnx is required")
    runs = []
    for round_ in range(args.rounds):
        for workers in (0, args.workers):
            info = measure(args.model, workers, args.samples)
            info.update(round=round_ + 1, workers=workers)
            runs.append(info)
            print(json.dumps(info), flush=True)
    load = os.getloadavg()
    one = [r["seconds"] for r in runs if r["workers"] == 0 and "seconds" in r]
    many = [r["seconds"] for r in runs if r["workers"] and "seconds" in r]
    prints = {r.get("fingerprint") for r in runs}
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from scale import machine   # the CPU's model name, cores, onnxruntime

    summary = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
               "model": args.model, "calibration": f"{args.samples} x {CALIB_TOKENS} random tokens, batch {CALIB_BATCH}",
               "load_average_after": [round(x, 2) for x in load], "runs": runs,
               "ratio_median": round(sorted(many)[len(many) // 2] / sorted(one)[len(one) // 2], 3) if one and many else None,
               "identical_output": len(prints) == 1 and None not in prints}
    print(f"\n| round | workers | wall s | driver peak MiB | weight tasks | fingerprint |\n|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['round']} | {r['workers'] or 1} | {r.get('seconds', r.get('error'))} | {r.get('driver_peak_rss_mib', '')} "
              f"| {r.get('weight_tasks', '')} | {str(r.get('fingerprint', ''))[:12]} |")
    print(f"\n{args.workers} workers / one process (medians): {summary['ratio_median']}; identical output: "
          f"{summary['identical_output']}; load average after {summary['load_average_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if summary["identical_output"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
