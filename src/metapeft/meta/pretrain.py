"""Multitask pretraining: one adapter trained jointly on the meta-train episodes, as a start for
meta-learning or as the strong baseline it is compared with.

Meta-Baseline (Chen et al., ICCV 2021) first trains a classifier on every base class and then
meta-learns from it: the pretraining gives features that keep improving over many steps, the
meta-learning a start that lands after one. On SmolLM2-135M the two inits split the curve the same
way: the Reptile init led at steps 0-1, the multitask init at step 5 on the WordNet corpus. So
``meta-train --pretrain-steps N`` runs this first and meta-learns from its θ.

Each step trains on one sampled episode's support + query with the standard cross-entropy
(``train.batch_loss``, the only loss path), Adam at the method's lr; the episode stream is fixed by
the seed, so the same call gives the same θ.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

# episode ids of the pretraining stream: far from the meta-train stream's, so the two never share
# an episode by construction of the ids (they may share examples: both draw from one pool)
STREAM_OFFSET = 7_000_000


def multitask_pretrain(adapter, source, steps: int, lr: float, *, seed: int = 0,
                       params: dict | None = None,
                       on_step: Callable[[int, float], None] | None = None) -> dict:
    """θ after ``steps`` Adam steps on ``source``'s episodes (support + query each), from
    ``params`` (default: the adapter's fresh init for ``seed``). ``on_step(t, loss)`` after each."""
    import mlx.core as mx
    import mlx.optimizers as optim

    from metapeft.scoring import TaskEncoder
    from metapeft.train import batch_loss

    params = adapter.init_params(seed) if params is None else params
    opt = optim.Adam(learning_rate=lr)
    opt.init(params)
    loss_and_grad = mx.value_and_grad(partial(batch_loss, adapter))
    for s in range(steps):
        task = source.sample(STREAM_OFFSET + 100_000 * seed + s)
        batch = TaskEncoder(adapter.base.tokenizer, task.labels).encode(task.support + task.query)
        loss, grads = loss_and_grad(params, batch)
        params = opt.apply_gradients(grads, params)
        mx.eval(params, loss)
        if on_step is not None:
            on_step(s + 1, loss.item())
    return params
