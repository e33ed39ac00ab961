"""Property-based tests (Hypothesis, issue 15): random rows and options given to the task reader
and to ``--set`` end in a result or a one-line ``UserError``, never an uncaught exception.

Each property runs 50 examples with no example database (nothing is written to the checkout).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metapeft.errors import UserError

SETTINGS = settings(max_examples=50, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

# JSON-ish values a row might hold, and row dicts with a few likely and unlikely keys
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
keys = st.sampled_from(["text", "label", "domain", "rating", "", "Text", "label "]) | st.text(
    max_size=6)
rows = st.lists(st.dictionaries(keys, values, max_size=4), max_size=12)
# raw lines: valid JSON objects, other JSON, broken JSON and arbitrary bytes
lines = st.lists(st.one_of(rows.map(lambda rs: json.dumps(rs[0]) if rs else "{}"),
                           values.map(json.dumps), st.text(max_size=20)), max_size=10)


def _write(name: str, data: bytes) -> Path:
    d = Path(tempfile.mkdtemp(prefix="metapeft-prop-"))
    p = d / name
    p.write_bytes(data)
    return p


def _one_line(e: UserError) -> None:
    msg = e.one_line()
    assert msg and "Traceback" not in msg


@SETTINGS
@given(rows=rows, text_field=st.sampled_from(["text", "label", "x", ""]),
       label_field=st.sampled_from(["label", "text", "domain"]), require=st.booleans())
def test_read_rows_of_random_jsonl_rows(rows, text_field, label_field, require):
    from metapeft.data.tasks import read_rows

    p = _write("rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    try:
        out = read_rows(p, text_field=text_field, label_field=label_field, require_label=require)
    except UserError as e:
        _one_line(e)
        return
    assert all(isinstance(e.text, str) and e.text.strip() for e in out)


@SETTINGS
@given(lines=lines, suffix=st.sampled_from([".jsonl", ".csv", ".txt"]),
       junk=st.binary(max_size=16))
def test_read_rows_of_random_lines_and_bytes(lines, suffix, junk):
    from metapeft.data.tasks import read_rows

    p = _write("data" + suffix, "\n".join(lines).encode("utf-8", "surrogatepass") + junk)
    try:
        read_rows(p)
    except UserError as e:
        _one_line(e)


@SETTINGS
@given(labels=st.lists(st.sampled_from(["a", "b", "c", "d", " ", "é"]), max_size=30),
       shots=st.one_of(st.none(), st.integers(-2, 6)), query=st.one_of(st.none(),
                                                                        st.integers(-2, 6)),
       ways=st.one_of(st.none(), st.integers(-1, 6)), seed=st.integers(0, 3),
       as_dir=st.booleans())
def test_load_task_with_random_rows_and_options(labels, shots, query, ways, seed, as_dir):
    from metapeft.data import load_task

    text = "".join(json.dumps({"text": f"row {i}", "label": lab}) + "\n"
                   for i, lab in enumerate(labels))
    if as_dir:
        p = _write("train.jsonl", text.encode()).parent
        (p / "valid.jsonl").write_text(text)
    else:
        p = _write("pool.jsonl", text.encode())
    try:
        task = load_task(p, shots=shots, query=query, ways=ways, seed=seed)
    except UserError as e:
        _one_line(e)
        return
    assert len(task.labels) >= 2 and task.support
    if not as_dir:
        assert shots is not None and shots >= 1 and len(task.support) == shots * len(task.labels)


set_keys = st.sampled_from(["rank", "alpha", "dropout", "target_modules", "num_layers",
                            "use_rslora", "use_dora", "lr", "steps", "optimizer", "loss",
                            "num_virtual_tokens", "init", "init_text", "encoder_type",
                            "encoder_hidden_size", "init_r", "target_r", "total_step",
                            "nosuch", ""])
set_values = st.one_of(st.sampled_from(["abc", "2.5", "true", "null", "[1, 2", "{a: 1}", "-1",
                                        "0", "1e6", ".nan", "self_attn.q_proj,mlp.up_proj",
                                        "[self_attn.q_proj]", "8", "", "='", "text"]),
                       st.text(max_size=10))


@SETTINGS
@given(items=st.lists(st.tuples(set_keys, set_values), max_size=4),
       bare=st.lists(st.text(max_size=6), max_size=1),
       method=st.sampled_from(["lora", "dora", "adalora", "prompt", "prefix", "ptuning"]))
def test_set_options_give_a_config_or_one_line(items, bare, method):
    """``--set KEY=VALUE`` strings, parsed as the CLI does, then split into run options and
    checked against the method's Config (types and ranges), without loading a model."""
    from metapeft.adapt import split_run_options
    from metapeft.adapters import get_adapter_class
    from metapeft.cli._common import parse_sets

    raw = [f"{k}={v}" for k, v in items] + bare
    try:
        options = parse_sets(raw, None)
        config, run = split_run_options(options, lr=None, steps=20, optimizer="adam",
                                        objective="ce")
        get_adapter_class(method).Config.from_dict(config)
    except UserError as e:
        _one_line(e)
        return
    assert run["lr"] is None or isinstance(run["lr"], float)
