"""Does FSDP shard on CPU (gloo), and does an uneven number of forwards across ranks hang it? Two processes, no GPU.

A tiny Qwen2-architecture model (spark_trl.testing) with a PEFT LoRA adapter (q_proj, v_proj) is sharded with
torch's FSDP2 (`fully_shard` on each decoder layer, then on the root) over a 2-rank CPU mesh with the gloo backend.
Each case runs, per rank: a training forward + backward + AdamW step, then no-grad forwards, then a barrier (the
next collective, as the trainer's next step would reach).

* `even`: both ranks run the same forwards; expected to finish.
* `uneven`: rank 0 runs one extra no-grad forward (as a rank with one more reference-log-prob chunk would); its
  parameter all-gather has no partner, since rank 1 has gone on to the barrier. Neither rank can return. The
  process group is created with a short gloo timeout (`--timeout`, seconds), so that the hang surfaces as a
  timeout error instead of blocking for gloo's default 30 minutes; the parent also kills ranks that outlive it.

Printed, one JSON line per case: whether each rank finished, the stage it reached and its error if any, and how
the model was held (an FSDP module, DTensor parameters sharded over the mesh, this rank's share of the elements).

    python benchmarks/fsdp_cpu_check.py             # both cases
    python benchmarks/fsdp_cpu_check.py --case even
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import tempfile
import time


def _rank(rank: int, port: int, model_path: str, case: str, timeout: float, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    report = {"rank": rank, "finished": False, "stage": "setup"}
    try:
        from peft import LoraConfig, get_peft_model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard
        from transformers import AutoModelForCausalLM

        dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=timeout))
        mesh = init_device_mesh("cpu", (2,))
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        params = list(model.parameters())
        report.update(torch=torch.__version__, backend=dist.get_backend(), fsdp_module=isinstance(model, FSDPModule),
                      sharded_params=sum(any(p.is_shard() for p in getattr(q, "placements", ())) for q in params),
                      params=len(params), local_numel=sum(q.to_local().numel() for q in params),
                      full_numel=sum(q.numel() for q in params))
        optimizer = torch.optim.AdamW([q for q in params if q.requires_grad], lr=1e-2)
        report["stage"] = "train step"
        torch.manual_seed(rank)  # different data per rank, as in data-parallel training
        ids = torch.randint(0, 300, (2, 12))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        report["loss"] = loss.item()
        forwards = 2 if case == "uneven" and rank == 0 else 1
        report["stage"] = f"{forwards} no-grad forward(s)"
        with torch.no_grad():
            for _ in range(forwards):
                model(input_ids=ids)
        report["stage"] = "barrier"
        dist.barrier()
        report["finished"] = True
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - the error is the result of the uneven case
        report["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    queue.put(report)


def run_case(model_path: str, case: str, timeout: float) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start = time.perf_counter()
    procs = [ctx.Process(target=_rank, args=(r, port, model_path, case, timeout, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    reports = []
    deadline = start + timeout + 120  # start-up (imports, model load) + the collective timeout
    for _ in procs:
        try:
            reports.append(queue.get(timeout=max(deadline - time.perf_counter(), 1)))
        except Exception:  # noqa: BLE001 - a rank that neither finished nor timed out
            break
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    reports.sort(key=lambda r: r["rank"])
    return {"case": case, "finished": len(reports) == 2 and all(r["finished"] for r in reports),
            "seconds": round(time.perf_counter() - start, 1), "gloo_timeout_s": timeout, "ranks": reports}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["even", "uneven", "both"], default="both")
    parser.add_argument("--timeout", type=float, default=20.0, help="gloo collective timeout, seconds")
    args = parser.parse_args(argv)
    from spark_trl.testing import build_tiny_model

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = str(build_tiny_model(tmp))
        for case in (["even", "uneven"] if args.case == "both" else [args.case]):
            result = run_case(path, case, args.timeout)
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


if __name__ == "__main__":
    main()
