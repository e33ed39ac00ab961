"""Shared fixtures. The tiny embedded model is built once into the user cache and reused."""

from __future__ import annotations

from pathlib import Path

import pytest

import os
import tempfile

# Keep the suite away from the user's registry and experience store (subprocesses inherit this).
# Always overridden, never setdefault: a user's own METAPEFT_HOME must not receive test records.
os.environ["METAPEFT_HOME"] = tempfile.mkdtemp(prefix="metapeft-tests-")

import metapeft  # noqa: E402,F401  (preloads OpenBLAS before mlx)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
CLINC = SHARED / "data" / "clinc150"
SMOL = SHARED / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def tiny():
    from metapeft.models import load_base_model

    return load_base_model("tiny")


@pytest.fixture(scope="session")
def stories():
    if not (STORIES / "config.json").exists():
        pytest.skip(f"real model not available: {STORIES} is absent")
    from metapeft.models import load_base_model

    return load_base_model(str(STORIES))


@pytest.fixture(scope="session")
def smol():
    if not (SMOL / "config.json").exists():
        pytest.skip(f"real model not available: {SMOL} is absent")
    from metapeft.models import load_base_model

    return load_base_model(str(SMOL))


@pytest.fixture(scope="session")
def clinc_dir():
    if not (CLINC / "train.jsonl").exists():
        pytest.skip(f"CLINC150 not available: {CLINC} is absent")
    return CLINC


@pytest.fixture
def small_task():
    """A 3-way 4-shot synthetic task with 4 query examples per class."""
    from metapeft.data.synthetic import generate_task

    return generate_task(3, family="topic", ways=3, shots=4, query=4)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A registry root of this test's own (METAPEFT_HOME), so no two tests share a store."""
    monkeypatch.setenv("METAPEFT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A 3-way 3-shot synthetic topic task written as a task directory (files may define their
    own ``task_dir`` with another task)."""
    from metapeft.data.synthetic import generate_task
    from metapeft.quickstart import write_task_dir

    return write_task_dir(generate_task(5, family="topic", ways=3, shots=3, query=3),
                          tmp_path_factory.mktemp("task"))

