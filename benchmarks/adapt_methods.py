"""Every PEFT method on stories260K, 5-way 5-shot CLINC150 tasks: accuracy after 0/5/10/50 steps
(mean ± 95% CI over tasks), steps/s, tokens/s, peak memory; and LoRA training throughput against
mlx-lm's own trainer step on the same model, batch and sequence lengths.

Tasks: episodes from the CLINC150 *test* split of the held-out domains (banking, travel), which
no default was tuned on. Run:  uv run python benchmarks/adapt_methods.py --tasks 50
"""

from __future__ import annotations

import argparse
import time

from _common import STORIES, HELD_OUT_DOMAINS, clinc_pool, fmt, mean_ci, require, write_json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np


def mlx_lm_trainer_tokens_per_second(base, task, steps: int = 20) -> tuple[float, int]:
    """Tokens/s of mlx-lm's LoRA training step (tuner.utils.linear_to_lora_layers +
    tuner.trainer.default_loss, compiled over model and optimizer state as mlx_lm.tuner.trainer
    does) on the support prompts followed by their gold label tokens."""
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from metapeft.adapters.base import structural_copy
    from metapeft.adapters.lora import ALL_LINEAR
    from metapeft.scoring import TaskEncoder

    model = structural_copy(base.model)
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 8, "scale": 2.0, "dropout": 0.0,
                                                     "keys": ALL_LINEAR})
    enc = TaskEncoder(base.tokenizer, task.labels)
    idx = {lab: i for i, lab in enumerate(task.labels)}
    seqs = [enc.prompt_tokens(e.text) + enc.label_tokens[idx[e.label]] for e in task.support]
    L = max(len(s) for s in seqs)
    batch = np.zeros((len(seqs), L), np.int32)
    for i, s in enumerate(seqs):
        batch[i, :len(s)] = s
    batch = mx.array(batch)
    lengths = mx.array([[0, len(s)] for s in seqs])
    opt = optim.Adam(learning_rate=1e-3)
    loss_value_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, opt.state]

    @mx.compile
    def step(b, lens):
        (lvalue, toks), grad = loss_value_and_grad(model, b, lens)
        opt.update(model, grad)
        return lvalue, toks

    step = mx.compile(step, inputs=state, outputs=state)
    mx.eval(step(batch, lengths), state)  # compile
    t = time.perf_counter()
    for _ in range(steps):
        mx.eval(step(batch, lengths), state)
    dt = time.perf_counter() - t
    return steps * len(seqs) * L / dt, int(sum(len(s) for s in seqs))


def theirs_tokens_per_batch(base, task) -> int:
    """Padded tokens in the mlx-lm batch (support prompts + gold labels, padded to the longest)."""
    from metapeft.scoring import TaskEncoder

    enc = TaskEncoder(base.tokenizer, task.labels)
    idx = {lab: i for i, lab in enumerate(task.labels)}
    seqs = [enc.prompt_tokens(e.text) + enc.label_tokens[idx[e.label]] for e in task.support]
    return len(seqs) * max(len(s) for s in seqs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", type=int, default=50)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--methods", default="lora,dora,adalora,prompt,prefix,ptuning")
    ap.add_argument("--model", default=str(STORIES))
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    require(STORIES, "stories260K")
    from metapeft import api
    from metapeft.adapters import get_adapter_class
    from metapeft.data.episodes import EpisodeSource
    from metapeft.models import load_base_model

    base = load_base_model(args.model)
    src = EpisodeSource(clinc_pool("test", domains=HELD_OUT_DOMAINS), ways=5, shots=5, query=10,
                        name="clinc150-test-heldout")
    tasks = [src.sample(20_000 + i) for i in range(args.tasks)]
    marks = [m for m in sorted({0, 5, 10, args.steps}) if m <= args.steps]
    results = {}
    for method in args.methods.split(","):
        accs, sps, tps, mem, params = [], [], [], [], None
        t0 = time.perf_counter()
        for task in tasks:
            # AdaLoRA's budget schedule scaled to the run: warm-up 10%, final phase 20% (peft
            # requires tinit < total - tfinal; its docs use similar fractions)
            extra = ({"tinit": args.steps // 10, "tfinal": args.steps // 5,
                      "deltaT": max(1, args.steps // 10)} if method == "adalora" else {})
            r = api.adapt(task, model=args.model, method=method, steps=args.steps, seed=0,
                          eval_at=set(marks), config=extra)
            accs.append(r.accuracies)
            sps.append(args.steps / r.extra["train_seconds"])
            tps.append(r.extra["tokens_per_second"])
            mem.append(r.extra["peak_memory_mb"])
            params = r.extra["trainable_parameters"]
        a = np.array(accs)
        results[method] = {
            "tasks": len(tasks), "lr": get_adapter_class(method).default_lr, "trainable_parameters": params,
            "accuracy": {m: mean_ci(a[:, j]) for j, m in enumerate(marks)},
            "steps_per_second": mean_ci(sps), "tokens_per_second": mean_ci(tps),
            "peak_memory_mb": float(np.max(mem)), "wall_seconds": time.perf_counter() - t0}
        print(f"{method}: " + "  ".join(f"step {m}: {fmt(a[:, j])}" for j, m in enumerate(marks))
              + f"  {np.mean(sps):.2f} steps/s", flush=True)
    ours = None
    if "lora" in results:
        from metapeft.adapters.lora import LoRA
        from metapeft.train import encode_task, train

        ad = LoRA.attach(base)
        data = encode_task(tasks[0], base.tokenizer)
        r = train(ad, ad.init_params(0), data, steps=21, evaluate_query=False)
        ours = r.tokens_per_second
        theirs, _ = mlx_lm_trainer_tokens_per_second(base, tasks[0])
        examples = len(tasks[0].support)
        ours_ex = 21 * examples / r.train_seconds
        theirs_ex = theirs / max(1, (theirs_len := theirs_tokens_per_batch(base, tasks[0]))) * examples
        results["lora_vs_mlx_lm"] = {"metapeft_tokens_per_second": ours,
                                     "mlx_lm_tokens_per_second": theirs, "ratio": ours / theirs,
                                     "metapeft_examples_per_second": ours_ex,
                                     "mlx_lm_examples_per_second": theirs_ex,
                                     "examples_ratio": ours_ex / theirs_ex,
                                     "mlx_lm_tokens_per_batch": theirs_len}
    print(f"\n## adapt_methods: stories260K, {len(tasks)} held-out 5-way 5-shot CLINC150 tasks "
          f"(test split, {', '.join(HELD_OUT_DOMAINS)})\n")
    print("| method | params | " + " | ".join(f"acc@{m}" for m in marks)
          + " | steps/s | tokens/s | peak MB |")
    print("|---|---|" + "---|" * len(marks) + "---|---|---|")
    for method, r in results.items():
        if method == "lora_vs_mlx_lm":
            continue
        cells = [f"{100 * r['accuracy'][m][0]:.1f} ± {100 * r['accuracy'][m][1]:.1f}" for m in marks]
        print(f"| {method} | {r['trainable_parameters']} | " + " | ".join(cells)
              + f" | {r['steps_per_second'][0]:.2f} | {r['tokens_per_second'][0]:.0f} | "
                f"{r['peak_memory_mb']:.0f} |")
    if ours is not None:
        v = results["lora_vs_mlx_lm"]
        print(f"\nLoRA training, same model and support batch: processed tokens/s metapeft "
              f"{v['metapeft_tokens_per_second']:.0f} vs mlx-lm trainer step "
              f"{v['mlx_lm_tokens_per_second']:.0f} (ratio {v['ratio']:.2f}); examples/s "
              f"{v['metapeft_examples_per_second']:.1f} vs {v['mlx_lm_examples_per_second']:.1f} "
              f"(ratio {v['examples_ratio']:.2f}: metapeft scores all 5 candidate labels per "
              f"example, mlx-lm's LM loss only the gold one)")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
