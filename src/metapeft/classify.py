"""Use an adapter directory as a classifier: ``predict`` and ``evaluate``.

``Classifier.load(dir)`` restores any method from what the directory says about itself
(``adapter_io.read_adapter_info``): the adapter on its base model, the label set in order with
the text scored for each, the prompt template. ``Classifier.probabilities(examples)`` scores them
exactly as ``adapt`` scored its query set (the same length buckets, the frozen trunk's states
computed once per batch, eval mode) and returns the softmax over the candidates' scores in input
order, so ``evaluate`` on the query set reproduces the accuracy ``adapt`` reported.

``read_inputs`` reads what ``predict`` classifies: a JSONL or CSV file, or ``-`` for standard
input (JSONL, or CSV when its first line does not start with ``{``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from metapeft.adapter_io import AdapterInfo, load_adapter, read_adapter_info
from metapeft.data.tasks import Example, decode_lines, read_rows
from metapeft.errors import UserError

BATCH_SIZE = 32  # adapt's query buckets (train.BUCKET_SIZE): the same batches, the same numbers
STDIN = "-"


def read_inputs(source: str | Path, *, text_field: str = "text", label_field: str = "label",
                require_label: bool = False, stdin=None) -> list[Example]:
    """The rows of a JSONL/CSV file, or of standard input for ``-``, each with its line number
    in ``extra["_line"]``; a row that cannot be read is a one-line ``UserError`` with its line."""
    if str(source) != STDIN:
        return read_rows(source, text_field=text_field, label_field=label_field,
                         require_label=require_label, with_lines=True)
    stream = stdin if stdin is not None else sys.stdin.buffer
    raw = stream.read()
    lines = decode_lines(raw if isinstance(raw, bytes) else raw.encode("utf-8"), "<stdin>")
    first = next((ln.strip() for ln in lines if ln.strip()), "")
    return read_rows("<stdin>", text_field=text_field, label_field=label_field,
                     require_label=require_label, lines=lines, with_lines=True,
                     fmt="jsonl" if first.startswith("{") else "csv")


def check_out_file(out: str | Path) -> Path:
    """``out`` as a file to write predictions to, its directory created; checked before any
    work is done (a one-line ``UserError`` otherwise)."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise UserError("is a directory, expected a file name", path=str(out), field="out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create its directory ({e.strerror or e})", path=str(out),
                        field="out") from None
    return out


def softmax(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, np.float64)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class Classifier:
    """An adapter restored from its directory, ready to score texts."""

    adapter: Any
    params: dict
    encoder: Any  # scoring.TaskEncoder over the directory's labels and template
    info: AdapterInfo

    @classmethod
    def load(cls, path: str | Path, model: str | None = None, *,
             dequantize: str = "auto") -> Classifier:
        """The adapter at ``path`` on ``model`` (default: the one it was trained on)."""
        from metapeft.scoring import MAX_PROMPT_TOKENS, TaskEncoder

        info = read_adapter_info(path)
        if not info.labels:
            raise UserError("the adapter directory records no label set (it predates "
                            "self-describing adapters); run `metapeft adapt --out` again",
                            path=info.path, field="labels")
        adapter, params = load_adapter(path, model, dequantize=dequantize)
        kwargs = {} if info.template is None else {"template": info.template}
        try:
            encoder = TaskEncoder(adapter.base.tokenizer, info.labels,
                                  max_prompt_tokens=info.max_prompt_tokens or MAX_PROMPT_TOKENS,
                                  verbalisations=info.verbalisations, **kwargs)
        except ValueError as e:  # a label that tokenises to nothing on this model
            raise UserError(str(e), path=info.path, field="verbalisations") from None
        return cls(adapter=adapter, params=adapter.scoring_params(params), encoder=encoder,
                   info=info)

    @property
    def labels(self) -> list[str]:
        return self.encoder.labels

    @property
    def model_id(self) -> str:
        return self.adapter.base.model_id

    def scores(self, examples: list[Example], *, batch_size: int = BATCH_SIZE,
               on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        """(N, C) candidate scores (summed label-token log-probabilities), in input order.
        ``on_batch(n)`` is called after each batch of ``n`` examples."""
        import mlx.core as mx

        if batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {batch_size}", field="batch_size")
        out = np.zeros((len(examples), len(self.labels)), np.float32)
        with self.adapter.scoring_mode():
            for idx in self.encoder.bucket_order(examples, batch_size):
                batch = self.adapter.prepare(self.encoder.encode([examples[i] for i in idx]))
                s = self.adapter.scores(self.params, batch).astype(mx.float32)
                out[idx] = np.array(s)
                if on_batch is not None:
                    on_batch(len(idx))
        return out

    def probabilities(self, examples: list[Example], **kwargs) -> np.ndarray:
        """(N, C) softmax over the candidates' scores, in input order."""
        return softmax(self.scores(examples, **kwargs))


def prediction(example: Example, probs: np.ndarray, labels: list[str],
               top_k: int | None = None) -> dict:
    """One output line: the row's ``id`` if it has one, else its text; the label; and the
    probabilities of the ``top_k`` most likely labels (all by default), most likely first."""
    order = np.argsort(-probs, kind="stable")[:top_k]
    key = {"id": example.extra["id"]} if "id" in example.extra else {"text": example.text}
    return {**key, "label": labels[int(order[0])],
            "probabilities": {labels[int(c)]: round(float(probs[c]), 6) for c in order}}


def text_examples(texts) -> list[Example]:
    """A list of texts (or ``Example``s) as the rows ``predict`` scores."""
    return [e if isinstance(e, Example) else Example(text=str(e), label="") for e in texts]


def predictions(clf: Classifier, rows: list[Example], *, top_k: int | None = None,
                batch_size: int = BATCH_SIZE,
                on_batch: Callable[[int], None] | None = None) -> list[dict]:
    """``predict``'s output for ``rows``: one ``prediction`` per row, in input order, scored
    in ``batch_size`` batches. ``api.predict`` and ``serve`` both answer through here."""
    probs = clf.probabilities(rows, batch_size=batch_size, on_batch=on_batch)
    return [prediction(e, p, clf.labels, top_k) for e, p in zip(rows, probs)]


def gold_indices(examples: list[Example], labels: list[str], source: str,
                 label_field: str = "label") -> np.ndarray:
    """Each example's gold label as an index into ``labels``; a label outside the adapter's set
    is a one-line ``UserError`` with its line."""
    index = {lab: i for i, lab in enumerate(labels)}
    out = np.empty(len(examples), np.int64)
    for i, e in enumerate(examples):
        if e.label not in index:
            shown = ", ".join(labels[:8]) + (", ..." if len(labels) > 8 else "")
            raise UserError(f"label {e.label!r} is not one of the adapter's {len(labels)} labels "
                            f"({shown})", path=source, line=e.extra.get("_line"),
                            field=label_field)
        out[i] = index[e.label]
    return out
