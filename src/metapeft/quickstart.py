"""``metapeft quickstart``: the main job end to end on the embedded default, offline.

1. build (once) the embedded tiny llama and generate a deterministic synthetic task;
2. write the task as an mlx-lm style directory (train.jsonl = support, valid.jsonl = query);
3. adapt a LoRA on it, with query accuracy at every step;
4. save the adapter (mlx-lm-loadable) and print what to run next.
"""

from __future__ import annotations

import json
from pathlib import Path

from metapeft.artifacts import atomic_write_text


def write_task_dir(task, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", task.support), ("valid.jsonl", task.query)):
        atomic_write_text(out / name, "".join(
            json.dumps({"text": e.text, "label": e.label, **e.extra}) + "\n" for e in rows))
    return out


def run_quickstart(out: Path | None = None, steps: int = 20, console=None, progress=None) -> dict:
    from metapeft.api import adapt
    from metapeft.data.synthetic import generate_task
    from metapeft.tiny_model import cache_dir

    out = Path(out) if out is not None else cache_dir() / "quickstart"
    say = console.print if console is not None else (lambda *a, **k: None)
    task = generate_task(seed=7, family="topic", ways=4, shots=8, query=10, noise=0.05)
    task_dir = write_task_dir(task, out / "task")
    say(f"[bold]task[/bold] {task.name}: {len(task.labels)} classes {task.labels}, "
        f"{len(task.support)} support / {len(task.query)} query -> {task_dir}")
    adapter_dir = out / "adapter"
    if progress is not None:
        with progress(steps, "adapt lora") as p:
            bar = p.add_task("adapt lora", total=steps, loss="-", acc="-")
            report = adapt(str(task_dir), model="tiny", method="lora", steps=steps, out=adapter_dir,
                           on_step=lambda i, loss, acc: p.update(
                               bar, completed=i, loss=f"{loss:.3f}",
                               acc="-" if acc is None else f"{acc:.1%}"))
    else:
        report = adapt(str(task_dir), model="tiny", method="lora", steps=steps, out=adapter_dir)
    accs = report.accuracies
    say(f"query accuracy: step 0 {accs[0]:.1%} -> step {len(accs) - 1} {accs[-1]:.1%}; "
        f"steps to 80%: {report.steps_to_target if report.target_reached else 'not reached'}")
    say(f"adapter: {adapter_dir} (loads with mlx_lm.load(model, adapter_path=...))")
    say(f"next: metapeft adapt {task_dir} --method prompt --steps {steps}")
    return {"task": str(task_dir), "adapter": str(adapter_dir), **report.to_json()}
