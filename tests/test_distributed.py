"""Data-parallel training: two CPU processes (gloo) launched by `accelerate launch`, one export, same format."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SMALL, wait_for_checkpoint

from skincancer.data import prepare
from skincancer.datablock import make_dataloaders
from skincancer.distributed import alone, distributed_fit, world_size
from skincancer.model import make_learner
from skincancer.predict import load
from skincancer.train import checkpoint_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """The processes started by `pid`, and theirs, from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        children = [p for p, parent in parents.items() if parent == current]
        found += children
        todo += children
    return found


def _launch() -> list[str]:
    """`accelerate launch` of two CPU processes on a free port."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port())]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_two_processes_train_and_only_the_main_one_exports(tmp_path, ham_dir):
    out = tmp_path / "models" / "ddp.pkl"
    train = ["-m", "skincancer", "train", "--data", str(ham_dir), *SMALL, "--epochs", "2", "--out", str(out)]
    run = subprocess.run(_launch() + train, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    # one process printed and wrote: one split table, one export line, one set of files and no leftovers
    assert run.stdout.count("split by lesion") == 1
    assert run.stdout.count("data-parallel on 2 processes: 32 images per process, 64 per step") == 1
    assert run.stdout.count("(the fastai learner)") == 1  # only the main process exports and says so
    assert sorted(p.name for p in out.parent.iterdir()) == ["ddp.check.safetensors", "ddp.json", "ddp.pkl",
                                                             "ddp.report.txt", "ddp.safetensors", "ddp.split.csv"]
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["processes"] == 2 and card["metrics"]["test"]["n"] > 0

    # the same format as a single process's export: plain BatchNorm layers, loads and predicts

    pickled = load(out, trusted=True).learn.model
    assert {type(m).__name__ for m in pickled.modules() if "Norm" in type(m).__name__} == {"BatchNorm1d",
                                                                                            "BatchNorm2d"}
    image = next((ham_dir / "images").glob("*.jpg"))
    res = load(out).predict(image)  # the safe path: the card and the safetensors weights
    assert res["label"] in ("benign", "malignant") and 0.0 <= res["malignant_probability"] <= 1.0


@pytest.mark.slow
def test_two_processes_resume_a_killed_run(tmp_path, ham_dir):
    import signal


    out = tmp_path / "ddp.pkl"
    train = ["-m", "skincancer", "train", "--data", str(ham_dir), *SMALL, "--epochs", "3", "--checkpoint-every", "0",
             "--out", str(out)]
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(_launch() + train, cwd=tmp_path, env=ENV, stdout=log, stderr=log)
        try:
            wait_for_checkpoint(checkpoint_dir(out) / "state.json", 0, proc, timeout=600)
        finally:
            # the launcher and its workers die together, as on a lost machine (each worker has a session of
            # its own, so killing the launcher's process group would leave them running)
            for pid in [*_descendants(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
    done = json.loads((checkpoint_dir(out) / "state.json").read_text())["epoch"]
    assert not out.exists() and done < 2

    # other settings: the main process refuses, and the other one hears it rather than waiting forever
    other = [*train[:train.index("3")], "4", *train[train.index("3") + 1:], "--resume"]
    run = subprocess.run(_launch() + other, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "used other settings (epochs: 3 then, 4 now)" in run.stderr

    run = subprocess.run(_launch() + train + ["--resume"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count(f"resuming from {checkpoint_dir(out)}: phase 1, epoch {done + 2} of 3") == 1
    assert run.stdout.count("(the fastai learner)") == 1 and not checkpoint_dir(out).exists()
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["processes"] == 2 and card["config"]["epochs"] == 3


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

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setitem(sys.modules, "accelerate", None)  # importing it would fail
    learn = make_learner(make_dataloaders(prepare(ham_dir, limit=60, seed=0), size=32, bs=8, num_workers=0),
                         pretrained=False)
    with distributed_fit(learn) as cbs:
        assert cbs == []

