"""Meta-step throughput, vectorised (mx.vmap over the meta-batch, optionally mx.compile) against
sequential (a Python loop over tasks), on the same tasks in one run; and the peak memory of
second-order MAML as the number of inner steps grows.

    uv run python benchmarks/meta_speed.py                       # tiny model
    uv run python benchmarks/meta_speed.py --model ../shared/models/stories260K
"""

from __future__ import annotations

import argparse
import time

from _common import write_json

import mlx.core as mx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--meta-batch", type=int, default=8)
    ap.add_argument("--inner-steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--algorithms", default="reptile,fomaml,maml")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from metapeft.adapters import get_adapter_class
    from metapeft.data.episodes import EpisodeSource
    from metapeft.data.synthetic import family_labels, generate_pool
    from metapeft.meta.batch import encode_episode, stack_episodes
    from metapeft.meta.learner import MetaConfig, MetaLearner
    from metapeft.models import load_base_model

    base = load_base_model(args.model)
    adapter = get_adapter_class(args.method).attach(base)
    src = EpisodeSource(generate_pool("topic", 0, 40), family_labels("topic"), ways=5, shots=5,
                        query=5)
    eps = [encode_episode(src.sample(i), base.tokenizer) for i in range(args.meta_batch)]
    stacked = [stack_episodes(eps)]
    theta = adapter.init_params(0)
    mx.eval(theta)
    results: dict = {"model": base.model_id, "meta_batch": args.meta_batch,
                     "inner_steps": args.inner_steps}
    print("| algorithm | mode | meta-steps/s | speed-up vs sequential |\n|---|---|---|---|")
    for alg in args.algorithms.split(","):
        cfg = dict(algorithm=alg, inner_steps=args.inner_steps, inner_lr=1e-3,
                   inner_optimizer="sgd" if alg == "maml" else "adam")
        rates = {}
        for mode, vec, comp in (("sequential", False, False), ("vmap", True, False),
                                ("vmap+compile", True, True)):
            ml = MetaLearner(adapter, MetaConfig(**cfg), vectorise=vec, compile=comp)
            ml.init_outer(theta)
            ml.step(theta, stacked, 0, 10)  # warm-up / compile
            if vec and not ml.vectorise:
                rates[mode] = None
                print(f"| {alg} | {mode} | fell back: {ml.fallback_reason} | - |")
                continue
            t = time.perf_counter()
            for r in range(args.repeats):
                ml.step(theta, stacked, r, 10)
            rates[mode] = args.repeats / (time.perf_counter() - t)
            print(f"| {alg} | {mode} | {rates[mode]:.2f} | "
                  f"{rates[mode] / rates['sequential']:.2f}x |", flush=True)
        results[alg] = rates
    print("\nsecond-order MAML peak memory (sequential, one task):\n\n| inner steps | peak MB |"
          "\n|---|---|")
    mem = {}
    one = [stack_episodes(eps[:1])]
    for k in (1, 2, 4, 8):
        ml = MetaLearner(adapter, MetaConfig(algorithm="maml", inner_steps=k, inner_lr=1e-3,
                                             inner_optimizer="sgd"), vectorise=False)
        ml.init_outer(theta)
        mx.clear_cache()
        mx.reset_peak_memory()
        ml.step(theta, one, 0, 10)
        mem[k] = mx.get_peak_memory() / 2**20
        print(f"| {k} | {mem[k]:.1f} |", flush=True)
    results["maml_peak_memory_mb"] = mem
    write_json(args.json, results)


if __name__ == "__main__":
    main()
