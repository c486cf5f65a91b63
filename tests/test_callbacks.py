"""Training callbacks: a loss that stops being finite, compile, and checkpoints that survive a crash."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import torch._dynamo
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.torch_core import set_seed
from torch._dynamo.utils import counters

from skincancer import SkinCancerError
from skincancer import callbacks as C
from skincancer import train as T
from skincancer.model import make_learner


def _tiny_learner(model=None):
    """A linear model (or `model`) on 64 random vectors: fastai's training loop in a fraction of a second."""
    set_seed(0)  # the data, the model and the shuffling: two learners train alike
    x = torch.randn(64, 4)
    items = list(zip(x, (x[:, 0] > 0).long()))
    dls = DataLoaders.from_dsets(items, items, bs=8, device="cpu", num_workers=0)  # fastai would fork one per core
    return Learner(dls, torch.nn.Linear(4, 2) if model is None else model, loss_func=torch.nn.CrossEntropyLoss())


class PoisonLoss(Callback):
    """Makes one training batch's loss NaN (0-based epoch and iteration)."""

    def __init__(self, epoch: int, iteration: int):
        self.at = (epoch, iteration)

    def after_loss(self):
        if self.training and (self.epoch, self.iter) == self.at:
            self.learn.loss_grad = self.loss_grad * float("nan")
            self.learn.loss = self.loss_grad.clone()


@pytest.mark.parametrize("epoch, iteration", [(1, 2), (2, 7)])  # (2, 7): the fit's last batch
def test_training_stops_with_a_clear_error_when_the_loss_stops_being_finite(epoch, iteration):
    learn = _tiny_learner()
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2, cbs=[PoisonLoss(epoch, iteration), C.StopOnNaN()])  # finite: trains quietly
        with pytest.raises(SkinCancerError, match=rf"became nan at epoch {epoch + 1}, iteration {iteration + 1}; "
                                                  "nothing was exported"):
            learn.fit(3, 1e-2, cbs=[PoisonLoss(epoch, iteration), C.StopOnNaN()])
    pickle.dumps(learn.recorder)


@pytest.mark.slow
def test_compile_builds_one_training_graph_and_validates_eagerly(small_dls, tmp_path):
    # 60 images at bs 8: full training batches, and a last validation batch smaller than the others
    assert len(small_dls.valid_ds) % small_dls.valid.bs != 0
    learn = make_learner(small_dls, "binary", "resnet18", pretrained=False)
    plain = learn.model
    torch._dynamo.reset()
    counters.clear()
    try:
        with learn.no_bar(), learn.no_logging():
            # dynamo's graph capture is what recompiles; the "eager" backend skips the slow code generation
            learn.fit_one_cycle(2, 1e-3, cbs=[C.CompileModel(backend="eager")])
        graphs, captured = counters["stats"]["unique_graphs"], counters["stats"]["calls_captured"]
    finally:
        torch._dynamo.reset()
    assert graphs == 1 and captured > 0  # one graph for training: no grad-free, no dynamic-shape recompiles
    assert learn.model is plain and plain._compiled_call_impl is None
    assert "CompileModel" not in [type(cb).__name__ for cb in learn.cbs]
    learn.export(tmp_path / "compiled.pkl")


@pytest.mark.slow
def test_a_crash_while_checkpointing_leaves_the_previous_checkpoint_whole(ham_dir, tmp_path, monkeypatch, capsys):
    config = T.TrainConfig(data=str(ham_dir), pretrained=False, epochs=3, size=32, bs=32, limit=120, num_workers=0,
                           out=str(tmp_path / "c.pkl"), checkpoint_every=0)
    real_write, writes = C.write_json_atomic, []

    def crash_on_the_second_state(path, data):
        writes.append(path)
        if len(writes) == 2:  # epoch 2's weights are written, its state.json is not: the process dies here
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(C, "write_json_atomic", crash_on_the_second_state)
    config, df, learn = T.setup(config)
    with pytest.raises(KeyboardInterrupt):
        T.fit(learn, config)
    folder = T.checkpoint_dir(config.out)
    state = json.loads((folder / "state.json").read_text())
    assert state["epoch"] == 0 and state["files"]["last"] == "last-0-0.pth"
    assert (folder / "last-0-1.pth").exists()  # the torn save's weights: named by no state, never read

    monkeypatch.setattr(C, "write_json_atomic", real_write)
    config, df, learn = T.setup(config)
    loaded, real_load = [], learn.load
    learn.load = lambda name, **kwargs: loaded.append(Path(name).name) or real_load(name, **kwargs)
    T.fit(learn, config, resume=True)
    assert loaded[0] == "last-0-0" and "phase 1, epoch 2 of 3" in capsys.readouterr().out


def test_piped_output_gets_the_epoch_table_without_bar_fragments(capsys, monkeypatch):
    monkeypatch.setattr(C, "on_terminal", lambda: False)
    learn = _tiny_learner()
    with C.epoch_lines():
        learn.fit(2, 1e-2)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "\r" not in out and "█" not in out
    assert lines[0].split()[:3] == ["epoch", "train_loss", "valid_loss"] and [line.split()[0] for line in lines[1:]] \
        == ["0", "1"]
