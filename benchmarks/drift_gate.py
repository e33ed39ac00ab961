"""The drift gate (``metapeft weights check``, ``drift.py``): does it pass honest new versions and
catch damaged ones?

One registry name; v1 is meta-trained with the default recipe. Each arm publishes another
version and checks it against v1 on the same fixed probe tasks (default 20 tasks, 5-way 5-shot,
5 query per class, 5 Adam steps at each version's own calibrated lr), at the default thresholds
(accuracy drop ≤ 2 points, drift = mean KL(p_old || p_new) ≤ 0.3):

* ``itself``: v1 against v1 (delta 0, drift 0 by construction);
* ``retrained, seed 1`` / ``seed 2``: the same recipe, another seed (an honest replacement);
* ``continued, 2x meta-steps``: the same run trained twice as long (an honest continuation);
* ``noise σ``: v1 with Gaussian noise of σ times each tensor's RMS added (damaged);
* ``shuffled labels``: meta-trained on the same pool with every label replaced by a random one
  (damaged).

    uv run python benchmarks/drift_gate.py [--model tiny] [--data synthetic] [--tasks 20]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (OpenBLAS preload before mlx)
import mlx.core as mx

from metapeft import api, drift
from metapeft import registry as reg
from metapeft.artifacts import load_safetensors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--tasks", type=int, default=drift.DEFAULT_TASKS)
    ap.add_argument("--steps", type=int, default=drift.DEFAULT_STEPS)
    ap.add_argument("--meta-steps", type=int, default=30)
    ap.add_argument("--noise", default="0.1,0.3,1.0")
    ap.add_argument("--registry")
    ap.add_argument("--json")
    args = ap.parse_args()
    root = Path(args.registry or tempfile.mkdtemp(prefix="drift-gate-"))
    common = dict(model=args.model, registry=root, meta_steps=args.meta_steps)

    def publish(label, **kw) -> str:
        t = time.perf_counter()
        rep = api.meta_train(kw.pop("data", args.data), name="g", **{**common, **kw})
        print(f"  {label}: g@{rep.version} in {time.perf_counter() - t:.0f} s", flush=True)
        return f"g@{rep.version}"

    print(f"registry {root}")
    arms = {"itself": publish("v1", seed=0)}
    arms["retrained, seed 1"] = publish("seed 1", seed=1)
    arms["retrained, seed 2"] = publish("seed 2", seed=2)
    arms["continued, 2x meta-steps"] = publish("2x", seed=0, meta_steps=2 * args.meta_steps)
    arrays, meta = load_safetensors(reg.resolve("g@1", root))
    for sigma in (float(s) for s in args.noise.split(",")):
        mx.random.seed(int(sigma * 1000))
        noisy = {k: v + sigma * mx.sqrt(mx.mean(v * v)) * mx.random.normal(v.shape)
                 for k, v in arrays.items()}
        v, _ = reg.save_version("g", noisy, meta, root)
        arms[f"noise σ = {sigma:g} x RMS"] = f"g@{v}"
    pool = _shuffled_pool(args.data, root)
    arms["shuffled labels"] = publish("shuffled", seed=0, data=str(pool))

    rows = []
    print(f"\n{args.tasks} probe tasks from {args.data}, {args.steps} steps; defaults: tolerance "
          f"{drift.DEFAULT_TOLERANCE}, max drift {drift.DEFAULT_MAX_DRIFT}\n")
    print("| new version | accuracy new | accuracy old | delta (paired, 95% CI) | drift (mean KL) "
          "| same label | verdict |")
    print("|---|---|---|---|---|---|---|")
    for label, spec in arms.items():
        r = drift.check(spec, "g@1", args.data, model=args.model, registry=root,
                        tasks=args.tasks, steps=args.steps)
        rows.append({"arm": label, "spec": spec, **r.to_json()})
        d = r.delta
        print(f"| {label} | {100 * r.accuracy_new['mean']:.1f} ± {100 * r.accuracy_new['ci']:.1f} "
              f"| {100 * r.accuracy_old['mean']:.1f} ± {100 * r.accuracy_old['ci']:.1f} "
              f"| {100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] "
              f"| {r.drift:.3f} | {100 * r.agreement:.0f}% "
              f"| {'pass' if r.passed else 'FAIL: ' + '; '.join(r.reasons)} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def _shuffled_pool(data: str, root: Path) -> Path:
    """The meta-train pool with each row's label replaced by a random label of the pool."""
    from metapeft.meta.sources import SYNTHETIC, synthetic_pool

    if data == SYNTHETIC:
        pool = synthetic_pool()
    else:
        from metapeft.data.tasks import read_rows

        pool = read_rows(data)
    labels = sorted({e.label for e in pool})
    rng = random.Random(0)
    out = root / "shuffled.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        for e in pool:
            f.write(json.dumps({"text": e.text, "label": rng.choice(labels),
                                **{k: v for k, v in e.extra.items() if k == "domain"}}) + "\n")
    return out


if __name__ == "__main__":
    main()
