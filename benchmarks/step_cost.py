"""What one LoRA training step costs on a real model, and where the time goes (issue #14).

One 5-way 5-shot task (10 query examples per class) from a CLINC150 meta-train domain (never the
held-out banking/travel test domains), SmolLM2-135M-Instruct dequantised to float32. In one
process, interleaved, the median seconds of a full training step (value_and_grad + Adam, compiled
as `train.py` compiles it) for:

  full/model-call   every block trained, mlx-lm's own forward (vocabulary head at every position):
                    the step as it was before the frozen-trunk work
  full/blocks       every block, head applied only at the scored positions
  top-k/blocks      LoRA on the top k blocks, the trunk recomputed every step
  top-k/trunk       LoRA on the top k blocks, the trunk's hidden states computed once per task,
                    every candidate's label continuation padded to the longest (masked)
  top-k/trunk+groups  the same with the continuations run unpadded, grouped by length, and
                    none for one-token labels (``Batch.label_groups``; the default path)

and the machine's measured fp32 GEMM rate, the physical limit: the approximate GFLOP/s each step
achieves is reported against it. Threads: run it as `OPENBLAS_NUM_THREADS=1` and `=2`.

    uv run python benchmarks/step_cost.py [--model PATH] [--top 8] [--reps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial

from _common import real_model_run, write_json

import mlx.core as mx



def gemm_gflops(n: int = 1024, reps: int = 10) -> float:
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a @ b)
    t0 = time.perf_counter()
    for _ in range(reps):
        mx.eval(a @ b)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def step_flops(base, batches, trained_blocks: int, head_rows: int, label_rows: int) -> float:
    """Forward + input-gradient matmul FLOPs of the blocks a step runs (4 x weights x tokens; the
    frozen weights get no weight gradient) over the prompts and ``label_rows`` continuation
    positions, plus the head at ``head_rows`` positions (x 2)."""
    layer = base.model.model.layers[0]
    w = sum(v.size for k, v in _linears(layer))
    tokens = sum(int(b.prompt.size) for b in batches) + label_rows
    vocab, d = base.model.model.embed_tokens.weight.shape
    return 4.0 * w * tokens * trained_blocks + 4.0 * vocab * d * head_rows


def _linears(layer):
    from mlx.utils import tree_flatten

    return [(k, v) for k, v in tree_flatten(layer.parameters()) if k.endswith("weight")
            and v.ndim == 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--arms", default=None, help="comma list of arm names to run (default all; "
                                                 "speed-ups are against the first one run)")
    args, base, source = real_model_run(ap)
    import metapeft.scoring as sc
    from metapeft.adapters import get_adapter_class
    from metapeft.train import batch_loss, encode_task, make_optimizer

    task = source.sample(args.seed)
    data = encode_task(task, base.tokenizer)
    L = base.num_layers
    # (top k, own block loop, trunk cache, continuations grouped by length)
    arms = {"full/model-call": (-1, False, False, False), "full/blocks": (-1, True, False, False),
            f"top-{args.top}/blocks": (args.top, True, False, False),
            f"top-{args.top}/trunk": (args.top, True, True, False),
            f"top-{args.top}/trunk+groups": (args.top, True, True, True)}
    if args.arms:
        arms = {k: v for k, v in arms.items() if k in args.arms.split(",")}
    steps, setups = {}, {}
    for name, (k, blocks, trunk, grouped) in arms.items():
        ad = get_adapter_class("lora").attach(base, {"num_layers": k})
        params = ad.init_params(0)
        opt = make_optimizer("adam", 1e-3)
        opt.init(params)
        t0 = time.perf_counter()
        support = data.support if grouped else [b._replace(label_groups=(), group_hidden=())
                                                for b in data.support]
        support = [ad.prepare(b) for b in support] if trunk else support
        mx.eval([b.hidden for b in support])
        setups[name] = time.perf_counter() - t0
        holder = {"p": params}
        state = [holder, opt.state, mx.random.state]
        vg = mx.value_and_grad(partial(batch_loss, ad))

        def step(bs, vg=vg, holder=holder, opt=opt):
            loss, g = vg(holder["p"], bs)
            holder["p"] = opt.apply_gradients(g, holder["p"])
            return loss

        steps[name] = (mx.compile(step, inputs=state, outputs=state), support, state, blocks)
    times = {n: [] for n in arms}
    saved = sc.BLOCK_MODEL_TYPES
    for rep in range(args.reps + 1):  # rep 0 compiles
        for name, (fn, support, state, blocks) in steps.items():
            sc.BLOCK_MODEL_TYPES = saved if blocks else frozenset()
            t0 = time.perf_counter()
            mx.eval(fn(support), state)
            if rep:
                times[name].append(time.perf_counter() - t0)
    sc.BLOCK_MODEL_TYPES = saved
    peak = gemm_gflops()
    B = sum(b.size for b in data.support)
    C = len(task.labels)
    lm = data.support[0].label_tokens.shape[1]
    full_rows = sum(int(b.prompt.size) for b in data.support) + B * C * (lm - 1)
    scored_rows = B + B * C * (lm - 1)
    real_rows = B + sum(b.size * g[1].size for b in data.support for g in b.label_groups)
    print(f"model {base.model_id} ({L} blocks), task {task.name}: {B} support x {C} candidates, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}, "
          f"fp32 GEMM {peak:.1f} GFLOP/s; label positions scored: {real_rows - B} real of "
          f"{scored_rows - B} padded")
    rows = {}
    base_med = statistics.median(times[next(iter(arms))])
    print("| step | median s | speed-up | setup s (once per task) | ~GFLOP/s | % of GEMM peak |")
    print("|---|---|---|---|---|---|")
    for name, (k, blocks, trunk, grouped) in arms.items():
        med = statistics.median(times[name])
        trained = L if k < 0 else k
        fl = step_flops(base, data.support, trained, real_rows if grouped else
                        scored_rows if blocks else full_rows,
                        (real_rows if grouped else scored_rows) - B)
        rows[name] = {"median_seconds": med, "all_seconds": times[name],
                      "speedup": base_med / med, "setup_seconds": setups[name],
                      "gflops": fl / med / 1e9}
        print(f"| {name} | {med:.2f} | {base_med / med:.1f}x | {setups[name]:.2f} | "
              f"{fl / med / 1e9:.1f} | {100 * fl / med / 1e9 / peak:.0f}% |")
    write_json(args.json, {"model": base.model_id, "task": task.name, "gemm_gflops": peak,
                           "threads": os.environ.get("OPENBLAS_NUM_THREADS"), "arms": rows})


if __name__ == "__main__":
    main()
