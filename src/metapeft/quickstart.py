"""``metapeft quickstart``: the whole story on the embedded default, offline, in about a minute.

1. build (once, ~25 s) the embedded tiny llama; generate the synthetic ``topic`` family;
2. meta-train a LoRA init with Reptile on 18 of its 24 topics (the other 6 never seen);
3. adapt on held-out tasks drawn only from the 6 unseen topics, from the meta-learned init and
   from a fresh init (standard fine-tuning), with query accuracy at every step;
4. print accuracy against steps for both, write one task as an mlx-lm style directory and its
   adapter (mlx-lm-loadable) so the next commands have something to run on.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from metapeft.artifacts import atomic_write_text

SHOW_STEPS = (0, 1, 2, 5, 10)


def write_task_dir(task, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", task.support), ("valid.jsonl", task.query)):
        atomic_write_text(out / name, "".join(
            json.dumps({"text": e.text, "label": e.label, **e.extra}) + "\n" for e in rows))
    return out


def mean_ci(values) -> tuple[float, float]:
    """Mean and 95% CI half-width (normal approximation, 1.96·sd/√n)."""
    v = np.asarray(values, dtype=float)
    if v.size < 2:
        return float(v.mean()) if v.size else float("nan"), float("nan")
    return float(v.mean()), float(1.96 * v.std(ddof=1) / math.sqrt(v.size))


def run_quickstart(out: Path | None = None, steps: int = 10, tasks: int = 8, meta_steps: int = 30,
                   console=None, progress=None) -> dict:
    from metapeft import api
    from metapeft.data.episodes import EpisodeSource
    from metapeft.data.synthetic import family_labels, generate_pool
    from metapeft.tiny_model import cache_dir

    out = Path(out) if out is not None else cache_dir() / "quickstart"
    say = console.print if console is not None else (lambda *a, **k: None)
    topics = family_labels("topic")
    held_out = topics[::4]
    say(f"[bold]1. data[/bold] synthetic 'topic' family: {len(topics)} topics; meta-train on "
        f"{len(topics) - len(held_out)}, hold out {held_out}")
    sources = api.build_meta_sources("synthetic", domains=["topic"], exclude_labels=held_out,
                                     ways=4, shots=4, query=4, val_fraction=0.2)

    def bar(total, desc):
        if progress is None:
            import contextlib

            return contextlib.nullcontext(None)
        return progress(total, desc)

    say(f"[bold]2. meta-train[/bold] Reptile, LoRA r8 on all linears, {meta_steps} meta-steps x "
        f"4 tasks x 5 inner steps")
    with bar(meta_steps, "meta-train") as p:
        t = p.add_task("meta-train", total=meta_steps, loss="-", acc="-") if p else None
        res = api.meta_train(
            name="quickstart", registry=out / "registry", algorithm="reptile", meta_steps=meta_steps,
            meta_batch=4, inner_steps=5, inner_lr=3e-3, outer_lr=1.0, eval_every=10,
            eval_episodes=4, ways=4, shots=4, query=4, sources=sources,
            calibrate_lr=False,  # both arms below adapt at one fixed lr, for a like-for-like table
            on_step=(lambda i, loss, acc, val: p.update(
                t, completed=i, loss=f"{loss:.3f}",
                acc=f"{acc:.1%}" + ("" if val is None else f" val {val:.1%}"))) if p else None)
    say(f"   published {res.path} ({res.seconds:.0f} s)")

    test = EpisodeSource(generate_pool("topic", seed=1, per_label=40), held_out, ways=4, shots=4,
                         query=8, name="held-out topics")
    curves: dict[str, list[list[float]]] = {"fresh": [], "meta": []}
    say(f"[bold]3. adapt[/bold] {tasks} held-out 4-way 4-shot tasks (unseen topics), {steps} steps, "
        f"fresh vs meta init")
    with bar(tasks * 2, "adapt") as p:
        t = p.add_task("adapt held-out", total=tasks * 2, loss="-", acc="-") if p else None
        for i in range(tasks):
            task = test.sample(1000 + i)
            for init in ("fresh", "meta"):
                r = api.adapt(task, steps=steps, init=None if init == "fresh" else res.path,
                              lr=1e-3, target=0.8)
                curves[init].append(r.accuracies)
                if p:
                    p.update(t, advance=1, loss=f"{r.losses[-1]:.3f}", acc=f"{r.final_accuracy:.1%}")
    marks = [s for s in SHOW_STEPS if s <= steps]
    table = {}
    for init, runs in curves.items():
        arr = np.array(runs)
        table[init] = {str(s): mean_ci(arr[:, s]) for s in marks}
        reach = [next((j for j, a in enumerate(run) if a >= 0.8), None) for run in runs]
        table[init]["steps_to_80"] = [x for x in reach]
    if console is not None:
        from rich.table import Table

        tt = Table(title=f"held-out query accuracy, mean ± 95% CI over {tasks} tasks")
        tt.add_column("init")
        for s in marks:
            tt.add_column(f"step {s}", justify="right")
        tt.add_column("reached 80%", justify="right")
        for init in ("fresh", "meta"):
            cells = [f"{table[init][str(s)][0]:.1%} ± {table[init][str(s)][1]:.1%}" for s in marks]
            hit = sum(x is not None for x in table[init]["steps_to_80"])
            tt.add_row("fresh LoRA" if init == "fresh" else "Reptile init", *cells,
                       f"{hit}/{tasks}")
        console.print(tt)

    example = test.sample(1000)
    task_dir = write_task_dir(example, out / "task")
    adapter_dir = out / "adapter"
    api.adapt(str(task_dir), steps=steps, init=res.path, lr=1e-3, out=adapter_dir)
    say(f"[bold]4. files[/bold] task {task_dir}  adapter {adapter_dir}  meta-weights {res.path}")
    say(f"next: metapeft adapt {task_dir} --init {res.path} --steps {steps}")
    return {"task": str(task_dir), "adapter": str(adapter_dir), "meta_weights": res.path,
            "tasks": tasks, "steps": steps,
            "accuracy": {init: {s: table[init][str(s)][0] for s in map(str, marks)}
                         for init in table},
            "ci95": {init: {s: table[init][str(s)][1] for s in map(str, marks)} for init in table},
            "steps_to_80": {init: table[init]["steps_to_80"] for init in table},
            "meta_train_seconds": round(res.seconds, 2)}
