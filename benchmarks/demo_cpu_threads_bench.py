"""The demo's CPU thread count: sampling speed of SmolLM2-135M-Instruct with 1 thread vs torch's default.

    python benchmarks/demo_cpu_threads_bench.py [--batch 8] [--tokens 32] [--threads 1 2]

Each setting runs in a fresh process (torch's thread pool cannot shrink once started) on the same prompts, after
one warm-up generate; prints wall and CPU seconds per setting, the ratio to the first one, and the machine's load
average (the result depends on it: on an idle machine more threads help, on a busy one they wait for each other).
Needs the converted model (``spark-trl demo`` converts it, or ``python -c "from spark_trl.smollm import
smollm2_path; smollm2_path()"``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
threads, batch, tokens, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(threads)
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(path).eval()
tok = AutoTokenizer.from_pretrained(path)
enc = tok(["def add(a, b):\n    return"] * batch, return_tensors="pt", padding=True)
kw = dict(do_sample=True, temperature=0.2, top_p=0.95, pad_token_id=tok.pad_token_id, min_new_tokens=tokens)
with torch.no_grad():
    model.generate(**enc, max_new_tokens=4, **kw)  # warm-up
    torch.manual_seed(0)
    wall, cpu = time.perf_counter(), time.process_time()
    model.generate(**enc, max_new_tokens=tokens, **kw)
print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    args = parser.parse_args()
    from spark_trl.smollm import smollm2_path

    path = str(smollm2_path())
    print(f"SmolLM2-135M-Instruct, batch {args.batch} x {args.tokens} new tokens, {os.cpu_count()} CPUs, "
          f"load average before: {os.getloadavg()[0]:.2f}")
    base = None
    for threads in args.threads:
        out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(args.batch), str(args.tokens), path],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        base = base or r["wall"]
        print(f"threads {threads}: wall {r['wall']:.1f} s, cpu {r['cpu']:.1f} s, "
              f"{args.batch * args.tokens / r['wall']:.0f} tok/s, wall ratio to threads {args.threads[0]}: "
              f"{r['wall'] / base:.2f}x   (load average now {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
