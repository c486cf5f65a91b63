"""Data-parallel training: two CPU processes (gloo) launched by `accelerate launch`, one export, same format."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from conftest import ROOT, SMALL
from skincancer.distributed import alone, world_size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_and_only_the_main_one_exports(tmp_path, ham_dir):
    out = tmp_path / "models" / "ddp.pkl"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]
    train = ["-m", "skincancer", "train", "--data", str(ham_dir), *SMALL, "--epochs", "2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(launch + train, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    # one process printed and wrote: one split table, one export line, one set of files and no leftovers
    assert run.stdout.count("split by lesion") == 1
    assert run.stdout.count("data-parallel on 2 processes: 32 images per process, 64 per step") == 1
    assert run.stdout.count("exported ") == 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["ddp.json", "ddp.pkl", "ddp.safetensors",
                                                             "ddp.split.csv"]
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["processes"] == 2 and card["metrics"]["test"]["n"] > 0

    # the same format as a single process's export: plain BatchNorm layers, loads and predicts
    from skincancer.predict import load

    pickled = load(out, trusted=True).learn.model
    assert {type(m).__name__ for m in pickled.modules() if "Norm" in type(m).__name__} == {"BatchNorm1d",
                                                                                            "BatchNorm2d"}
    image = next((ham_dir / "images").glob("*.jpg"))
    res = load(out).predict(image)  # the safe path: the card and the safetensors weights
    assert res["label"] in ("benign", "malignant") and 0.0 <= res["malignant_probability"] <= 1.0


def test_alone_hides_the_other_processes_and_restores_them(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert world_size() == 4
    with alone():
        assert world_size() == 1
    assert world_size() == 4
    monkeypatch.delenv("WORLD_SIZE")
    with alone():
        assert world_size() == 1
    assert "WORLD_SIZE" not in os.environ


def test_one_process_needs_no_accelerate_and_gets_no_callbacks(monkeypatch, ham_dir):
    from skincancer.data import make_dataloaders, prepare
    from skincancer.distributed import distributed_fit
    from skincancer.train import make_learner

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setitem(sys.modules, "accelerate", None)  # importing it would fail
    learn = make_learner(make_dataloaders(prepare(ham_dir, limit=60, seed=0), size=32, bs=8, num_workers=0),
                         pretrained=False)
    with distributed_fit(learn) as cbs:
        assert cbs == []

