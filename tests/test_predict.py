"""Use what you adapted (issue 16): self-describing adapter directories for every method,
``predict`` and ``evaluate``, and the round trip adapt --out D -> predict D -> evaluate D that
reproduces the accuracy adapt reported.

The commands run in process through typer's runner (one subprocess test covers standard input
and the exit status)."""

import json
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from metapeft.adapters import METHODS
from metapeft.cli import app

runner = CliRunner()


def cli(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


def one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    from metapeft.data.synthetic import generate_task
    from metapeft.quickstart import write_task_dir

    return write_task_dir(generate_task(4, family="topic", ways=3, shots=3, query=3),
                          tmp_path_factory.mktemp("task"))


@pytest.fixture(scope="module")
def lora_dir(task_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters") / "lora"
    r = cli("adapt", task_dir, "--steps", "2", "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    return out


def _jsonl(text: str) -> list[dict]:
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]


def round_trip(task_dir, out, *adapt_args):
    """adapt --out, predict, evaluate on the adapt run's query set: (adapt's final accuracy,
    predict's accuracy, evaluate's accuracy, evaluate's JSON)."""
    r = cli("adapt", task_dir, *adapt_args, "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    reported = json.loads(r.stdout)["final_accuracy"]
    query = task_dir / "valid.jsonl"
    gold = [json.loads(ln)["label"] for ln in query.read_text().splitlines() if ln.strip()]
    p = cli("predict", out, query)
    assert p.exit_code == 0, p.stderr
    preds = _jsonl(p.stdout)
    assert len(preds) == len(gold)
    predicted = sum(q["label"] == g for q, g in zip(preds, gold)) / len(gold)
    e = cli("evaluate", out, query, "--json")
    assert e.exit_code == 0, e.stderr
    ev = json.loads(e.stdout)
    return reported, predicted, ev["accuracy"], ev


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_every_method(task_dir, tmp_path, method):
    out = tmp_path / method
    reported, predicted, evaluated, ev = round_trip(task_dir, out, "--method", method,
                                                    "--steps", "2", "--seed", "1")
    assert predicted == evaluated == reported
    assert ev["num_examples"] == 9 and len(ev["per_class"]) == 3 and ev["ece_bins"] == 15
    # the directory describes itself, in the header and in adapter_config.json
    from metapeft.adapter_io import read_adapter_info

    info = read_adapter_info(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert info.method == cfg["method"] == method
    labels = sorted({json.loads(ln)["label"] for ln in (task_dir / "train.jsonl").open()})
    assert info.labels == cfg["labels"] == labels and len(labels) == 3
    assert info.verbalisations == cfg["verbalisations"]
    assert "{text}" in info.template and info.template == cfg["template"]
    assert info.objective == cfg["objective"] == "ce"
    assert info.base_model == "tiny" and info.base_model_hash == cfg["base_model_hash"]
    prov = info.provenance
    assert prov == cfg["provenance"]
    from metapeft.adapters import get_adapter_class

    steps = 0 if get_adapter_class(method).training_free else 2  # prototype: no optimizer step
    assert prov["seed"] == 1 and prov["steps"] == steps and prov["init"] is None
    assert prov["final_accuracy"] == reported


def test_init_provenance_names_the_registry_version(task_dir, tmp_path):
    from metapeft import api
    from metapeft.adapter_io import describe_init, read_adapter_info

    api.meta_train("synthetic", name="prov16", meta_steps=1, meta_batch=1, inner_steps=1,
                   eval_every=0, ways=3, shots=2, query=2)  # the test registry ($METAPEFT_HOME)
    assert describe_init("prov16") == "prov16@1" == describe_init("prov16@latest")
    assert describe_init(None) is None and describe_init(str(task_dir)) == str(task_dir)
    rep = api.adapt(task_dir, steps=1, init="prov16", out=tmp_path / "a")
    prov = read_adapter_info(tmp_path / "a").provenance
    assert prov["init"] == "prov16@1" and prov["final_accuracy"] == rep.final_accuracy


def test_predict_options_and_order(lora_dir, task_dir, tmp_path):
    rows = [{"text": "rain forecast storm umbrella", "id": "r1"}, {"text": "album guitar song"},
            {"text": "a very long text about travel " * 5, "id": 3}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    full = _jsonl(cli("predict", lora_dir, src).stdout)
    assert [p.get("id", p.get("text")) for p in full] == ["r1", "album guitar song", 3]
    for p in full:
        probs = p["probabilities"]
        assert len(probs) == 3 and sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert list(probs)[0] == p["label"] and list(probs.values()) == sorted(probs.values(),
                                                                               reverse=True)
    top = _jsonl(cli("predict", lora_dir, src, "--top-k", "2", "--batch-size", "1").stdout)
    assert [len(p["probabilities"]) for p in top] == [2, 2, 2]
    assert [p["label"] for p in top] == [p["label"] for p in full]  # batching changes nothing
    for a, b in zip(top, full):
        for k, v in a["probabilities"].items():
            assert v == pytest.approx(b["probabilities"][k], abs=1e-5)
    # --out writes the same lines; --json then prints a summary
    r = cli("predict", lora_dir, src, "--out", tmp_path / "sub" / "p.jsonl", "--json")
    assert r.exit_code == 0, r.stderr
    assert _jsonl((tmp_path / "sub" / "p.jsonl").read_text()) == full
    summary = json.loads(r.stdout)
    assert summary["count"] == 3 and sum(summary["predicted"].values()) == 3
    # CSV input, with an id column
    csv_in = tmp_path / "in.csv"
    csv_in.write_text("id,text\nx,rain forecast storm umbrella\ny,album guitar song\n")
    assert [p["id"] for p in _jsonl(cli("predict", lora_dir, csv_in).stdout)] == ["x", "y"]
    # the api takes a list of texts too
    from metapeft import api

    rep = api.predict(lora_dir, ["rain forecast storm umbrella"], top_k=1)
    assert rep.predictions[0]["label"] == full[0]["label"] and rep.to_json()["count"] == 1


def test_evaluate_human_output_and_plot(lora_dir, task_dir, tmp_path, monkeypatch):
    r = cli("evaluate", lora_dir, task_dir / "valid.jsonl")
    assert r.exit_code == 0, r.stderr
    assert "macro avg" in r.stdout and "ECE (15 equal-width bins)" in r.stdout
    # without matplotlib, --plot is one line and exit 2 (before any model loads)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    one_line_error(cli("evaluate", lora_dir, task_dir / "valid.jsonl", "--plot", tmp_path / "p"),
                   "plot' extra")
    assert not (tmp_path / "p").exists()


def test_evaluate_writes_pngs(lora_dir, task_dir, tmp_path):
    pytest.importorskip("matplotlib")
    r = cli("evaluate", lora_dir, task_dir / "valid.jsonl", "--plot", tmp_path / "p", "--json")
    assert r.exit_code == 0, r.stderr
    plots = json.loads(r.stdout)["plots"]
    assert set(plots) == {"confusion_matrix", "reliability"}
    for path in plots.values():
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_one_line(lora_dir, task_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": oops}\n')
    one_line_error(cli("predict", lora_dir, bad), "bad.jsonl:3")
    empty_text = tmp_path / "empty_text.csv"
    empty_text.write_text("text\nok\n\"\"\n")
    one_line_error(cli("predict", lora_dir, empty_text), "empty_text.csv:3")
    one_line_error(cli("predict", lora_dir, tmp_path / "missing.jsonl"), "does not exist")
    one_line_error(cli("predict", lora_dir, task_dir / "valid.jsonl", "--top-k", "0"), "top-k")
    one_line_error(cli("predict", lora_dir, task_dir / "valid.jsonl", "--out", tmp_path),
                   "is a directory")
    one_line_error(cli("predict", tmp_path / "nope", task_dir / "valid.jsonl"), "does not exist")
    unknown = tmp_path / "unknown.jsonl"
    known = json.loads((task_dir / "valid.jsonl").read_text().splitlines()[0])["label"]
    unknown.write_text(json.dumps({"text": "a", "label": known}) + "\n"
                       + '{"text": "b", "label": "cooking"}\n')
    one_line_error(cli("evaluate", lora_dir, unknown), "unknown.jsonl:2")
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text('{"text": "a"}\n')
    one_line_error(cli("evaluate", lora_dir, unlabelled), "missing label")


def test_mismatched_model_is_refused(lora_dir, task_dir, tiny, tmp_path):
    """Same architecture, other checkpoint (its config differs): one clear line, exit 2."""
    other = tmp_path / "other-model"
    shutil.copytree(tiny.path, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "note": "another model"}))
    r = cli("predict", lora_dir, task_dir / "valid.jsonl", "--model", other)
    one_line_error(r, "adapter was trained on base model 'tiny'")
    assert "fingerprint" in r.stderr
    from metapeft.errors import UserError
    from metapeft.api import load_adapter

    with pytest.raises(UserError, match="fingerprint"):
        load_adapter(lora_dir, str(other))
    adapter, params = load_adapter(lora_dir, tiny.path)  # the same model by path is fine
    assert adapter.base.fingerprint == tiny.fingerprint


def test_adapter_without_labels_says_so(task_dir, tiny, tmp_path):
    from metapeft.adapters import get_adapter_class
    from metapeft.api import save_adapter

    ad = get_adapter_class("lora").attach(tiny, {"rank": 2})
    save_adapter(tmp_path / "old", ad, ad.init_params(0))  # no description, as before #16
    one_line_error(cli("predict", tmp_path / "old", task_dir / "valid.jsonl"), "no label set")


def test_stdin_and_exit_status(lora_dir, tmp_path):
    """The installed entry point: - reads standard input (JSONL or CSV); a bad row is one line
    with its line number and exit 2; a long input shows a progress bar on stderr only."""
    exe = [sys.executable, "-m", "metapeft.cli"]
    ok = subprocess.run(exe + ["predict", str(lora_dir), "-"], capture_output=True, text=True,
                        input='{"text": "rain storm", "id": 1}\n{"text": "guitar song"}\n')
    assert ok.returncode == 0, ok.stderr
    assert [p.get("id") for p in _jsonl(ok.stdout)] == [1, None]
    csv_ok = subprocess.run(exe + ["predict", str(lora_dir), "-", "--top-k", "1"],
                            capture_output=True, text=True, input="text\nrain storm\n")
    assert csv_ok.returncode == 0 and len(_jsonl(csv_ok.stdout)) == 1, csv_ok.stderr
    bad = subprocess.run(exe + ["predict", str(lora_dir), "-"], capture_output=True, text=True,
                         input='{"text": "fine"}\n{"text": oops}\n')
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: <stdin>:2: malformed JSON (Expecting value at column 10)"), bad.stderr
    assert not bad.stdout
    many = "".join(json.dumps({"text": f"rain {i}"}) + "\n" for i in range(300))
    long = subprocess.run(exe + ["predict", str(lora_dir), "-"], capture_output=True, text=True,
                          input=many)
    assert long.returncode == 0, long.stderr
    assert [p["text"] for p in _jsonl(long.stdout)] == [f"rain {i}" for i in range(300)]
    assert "predict" in long.stderr and "300/300" in long.stderr


@pytest.mark.parametrize("method", METHODS)
def test_clinc_round_trip_on_stories260k(stories, clinc_dir, tmp_path, method):
    """A CLINC150 episode on stories260K: adapt --out, predict and evaluate agree, every method."""
    from metapeft.data import load_task
    from metapeft.quickstart import write_task_dir

    task = load_task(clinc_dir / "train.jsonl", ways=5, shots=4, query=4, seed=3)
    d = write_task_dir(task, tmp_path / "clinc")
    reported, predicted, evaluated, ev = round_trip(d, tmp_path / "a", "--model", stories.path,
                                                    "--method", method, "--steps", "2",
                                                    "--lr", "1e-2")
    assert predicted == evaluated == reported
    assert ev["model"] == stories.model_id and ev["num_examples"] == 20


def test_prototype_round_trip(task_dir, tmp_path):
    """The training-free method: adapt --method prototype runs no step and saves the class
    means (one unit row per label, in the directory's label order) with the usual header;
    predict's probabilities are softmax(cosine / temperature); evaluate reproduces adapt."""
    import numpy as np

    from metapeft.adapter_io import read_adapter_info
    from metapeft.artifacts import load_safetensors

    out = tmp_path / "proto"
    reported, predicted, evaluated, ev = round_trip(task_dir, out, "--method", "prototype",
                                                    "--steps", "5")
    assert predicted == evaluated == reported
    info = read_adapter_info(out)
    assert info.method == "prototype" and info.provenance["steps"] == 0
    assert info.provenance["lr"] is None and info.config == {"pooling": "mean", "center": True,
                                                             "temperature": 0.1}
    arrays, meta = load_safetensors(out / "adapters.safetensors")
    means = np.asarray(arrays["means"])
    assert set(arrays) == {"means", "center"} and means.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(means, axis=1), 1.0, atol=1e-5)
    assert meta["kind"] == "adapter" and meta["base_model"] == "tiny"
    # the probabilities are a softmax over cosines / 0.1: log-ratios within [-20, 20]
    from metapeft import api

    probs = api.predict(out, ["rain forecast storm umbrella"]).predictions[0]["probabilities"]
    p = np.array(list(probs.values()))
    assert p.sum() == pytest.approx(1, abs=1e-5) and np.log(p.max() / p.min()) <= 20 + 1e-3
    # nothing to start from, and nothing to meta-learn
    one_line_error(cli("adapt", task_dir, "--method", "prototype", "--init", out),
                   "training-free")
    with pytest.raises(Exception, match="training-free"):
        api.meta_train("synthetic", method="prototype", name="nope", meta_steps=1)


def test_prototype_on_clinc_stories260k(stories, clinc_dir, tmp_path):
    """On a CLINC150 episode with stories260K the nearest class mean is far above chance, and
    evaluate reproduces the accuracy adapt reported."""
    from metapeft.data import load_task
    from metapeft.quickstart import write_task_dir

    task = load_task(clinc_dir / "train.jsonl", ways=5, shots=5, query=10, seed=3)
    d = write_task_dir(task, tmp_path / "clinc")
    reported, predicted, evaluated, ev = round_trip(d, tmp_path / "p", "--model", stories.path,
                                                    "--method", "prototype")
    assert predicted == evaluated == reported and ev["num_examples"] == 50
    assert reported >= 0.5  # chance is 0.2


def test_stop_at_target(task_dir, tmp_path):
    """adapt --stop-at-target ends the run at the first step that reaches --target, reports that
    step, and the adapter written is the one of that step."""
    from metapeft import api
    from metapeft.adapter_io import read_adapter_info

    full = api.adapt(task_dir, steps=6, lr=1e-2, target=None)
    target = max(full.accuracies[1:])
    k = full.accuracies.index(target)
    r = cli("adapt", task_dir, "--steps", "6", "--lr", "1e-2", "--target", target,
            "--stop-at-target", "--out", tmp_path / "a", "--json")
    assert r.exit_code == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["steps_to_target"] == k and obj["target_reached"]
    assert obj["accuracies"] == pytest.approx(full.accuracies[:k + 1], abs=1e-6)
    assert len(obj["losses"]) == k
    assert read_adapter_info(tmp_path / "a").provenance["steps"] == k
    e = cli("evaluate", tmp_path / "a", task_dir / "valid.jsonl", "--json")
    assert json.loads(e.stdout)["accuracy"] == obj["final_accuracy"] >= target
    # reached by the init itself: no step runs; the human output says where it stopped
    h = cli("adapt", task_dir, "--steps", "3", "--target", "0", "--stop-at-target")
    assert h.exit_code == 0 and "stopped at step 0" in h.stdout, h.stderr
    with pytest.raises(Exception, match="needs a --target"):
        api.adapt(task_dir, steps=1, target=None, stop_at_target=True)


@pytest.mark.parametrize("method", METHODS)
def test_clinc_round_trip_on_smollm2(smol, clinc_dir, tmp_path, method):
    """The headline model: adapt --out on a CLINC150 episode (SmolLM2-135M, dequantised on the
    CPU), then predict and evaluate reproduce the accuracy adapt reported; the directory names
    the original checkpoint."""
    from metapeft.data import load_task
    from metapeft.quickstart import write_task_dir

    task = load_task(clinc_dir / "train.jsonl", ways=3, shots=2, query=2, seed=5)
    d = write_task_dir(task, tmp_path / "clinc")
    reported, predicted, evaluated, ev = round_trip(d, tmp_path / method, "--model", smol.path,
                                                    "--method", method, "--steps", "1")
    assert predicted == evaluated == reported
    assert ev["model"] == smol.model_id and ev["num_examples"] == 6
