"""fastai callbacks of a training run: the best epoch, resumable checkpoints, a loss that stops being finite, and
torch.compile. Pass them to one `fit(cbs=...)`: a learner keeps callbacks added with `add_cb` and would export them."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

import fastai.callback.progress as fastai_progress
import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.tracker import SaveModelCallback
from fastai.learner import save_model
from fastai.torch_core import get_model
from fastprogress.fastprogress import ConsoleMasterBar, ConsoleProgressBar, MasterBar, ProgressBar

from .console import on_terminal
from .distributed import is_main_process
from .errors import SkinCancerError
from .files import atomic_path, write_json_atomic


class BestEpochTracker(SaveModelCallback):
    """fastai's SaveModelCallback (the best epoch by `monitor`), keeping the best weights in memory, not on disk.

    Writing the weights at every improvement costs more than a GPU epoch; `Checkpoint` writes them beside its
    checkpoint instead. It ignores the epochs a resumed fit skips: fastai still fires after_epoch for them, before the
    Recorder has any values, and SaveModelCallback fails on them (fastai issue #3780). In a distributed run every
    process tracks the same (gathered) metric, so all of them restore the same epoch.
    """

    def __init__(self, monitor: str, skip_to: int = 0):
        super().__init__(monitor=monitor, comp=np.greater, fname="best", with_opt=False)
        self.skip_to, self.best_state = skip_to, None

    def _save(self, name):
        # get_model: the plain module's keys, also while DistributedDataParallel wraps it
        self.best_state = {k: v.detach().clone() for k, v in get_model(self.learn.model).state_dict().items()}

    def after_epoch(self):
        if self.epoch >= self.skip_to:
            super().after_epoch()

    def after_fit(self, **kwargs):
        if self.best_state is not None:
            get_model(self.learn.model).load_state_dict(self.best_state)
        elif (self.learn.path / self.learn.model_dir / f"{self.fname}.pth").exists():
            super().after_fit(**kwargs)  # a resumed fit with no better epoch: the best saved before it


class Checkpoint(Callback):
    """Saves weights, optimiser and progress atomically for --resume, at most every `every` seconds and at the end.

    Each save writes files named by its phase and epoch, then `state.json` naming them and the run's `identity`
    (its settings), then removes the files no state names: a crash in between leaves the previous save whole.
    In a distributed run only the main process writes.
    """

    order = BestEpochTracker.order + 1  # after the tracker has seen this epoch's metric

    def __init__(self, folder: Path, phase: int, identity: dict, tracker: BestEpochTracker, every: float,
                 skip_to: int = 0):
        self.folder, self.phase, self.identity, self.tracker = folder, phase, identity, tracker
        self.every, self.skip_to = every, skip_to
        self.best_epoch: int | None = None
        self.best_file: str | None = None  # a resumed fit: the interrupted run's best weights until it finds better
        self.saved_best: dict | None = None

    def before_fit(self):
        self.saved_at = time.monotonic()

    def after_epoch(self):
        if self.epoch < self.skip_to:  # skipped by a resumed fit: nothing new to save
            return
        if getattr(self.tracker, "new_best", False):
            self.best_epoch = self.epoch
        last = self.epoch + 1 == self.n_epoch
        if not is_main_process() or not (last or time.monotonic() - self.saved_at >= self.every):
            return
        self.saved_at = time.monotonic()
        self.save(f"{self.phase}-{self.epoch}")

    def save(self, tag: str) -> None:
        """Write this epoch's files, then the state naming them, then remove what no state names."""
        best = self.tracker.best_state
        if best is not None and self.saved_best is not best:
            self.best_file = f"best-{tag}.pth"
            with atomic_path(self.folder / self.best_file) as tmp:
                torch.save(best, tmp)
            self.saved_best = best
        files = {"last": f"last-{tag}.pth"}
        with atomic_path(self.folder / files["last"]) as tmp:
            save_model(tmp, self.learn.model, self.learn.opt, with_opt=True)
        if self.best_file is not None:
            files["best"] = self.best_file
        write_json_atomic(self.folder / "state.json", {
            "phase": self.phase, "epoch": self.epoch, "best": float(self.tracker.best), "best_epoch": self.best_epoch,
            "files": files, "config": self.identity})
        for old in self.folder.glob("*.pth"):
            if old.name not in files.values():
                old.unlink(missing_ok=True)


def diverged(loss: float, epoch: int, iteration: int) -> SkinCancerError:
    """The error that stops a fit whose loss is no longer finite (0-based epoch and iteration)."""
    return SkinCancerError(f"training diverged: the loss became {loss} at epoch {epoch + 1}, "
                           f"iteration {iteration + 1}; nothing was exported. Try a lower --lr or a smaller --bs.")


class StopOnNaN(Callback):
    """Stops training with SkinCancerError when the loss stops being finite."""

    order = 60  # after the loss is computed and recorded

    def after_batch(self):
        if self.training and not torch.isfinite(self.loss).all():
            raise diverged(float(self.loss.detach()), self.epoch, self.iter)


class CompileModel(Callback):
    """Trains through torch.compile (static shapes) and validates eagerly.

    Only the training step is compiled: its batches all have one shape (fastai drops the last partial training
    batch), so one graph is built. Compiling validation too would add a graph for gradient-free mode and another
    for the last, smaller validation batch, which PyTorch compiles with dynamic shapes, slower for every batch after.
    """

    order = -1  # with ChannelsLast, before anything wraps the model

    def __init__(self, **kwargs):
        self.kwargs = {"dynamic": False, **kwargs}

    def before_fit(self):
        self.model_ = get_model(self.learn.model)
        self.model_.compile(**self.kwargs)
        self.compiled = self.model_._compiled_call_impl

    def before_train(self):
        self.model_._compiled_call_impl = self.compiled

    def before_validate(self):
        self.model_._compiled_call_impl = None  # nn.Module.__call__ runs the plain forward

    def after_fit(self):
        # dropped so the learner can be pickled and predicts eagerly
        self.model_._compiled_call_impl = None
        self.model_ = self.compiled = None


class LineProgressBar(ConsoleProgressBar):
    """fastai's console progress bar, drawing nothing: where output goes to a file, the epoch table's lines alone."""

    def __init__(self, gen, total=None, display=True, leave=True, parent=None, master=None, **kwargs):
        ProgressBar.__init__(self, gen, total, display, leave, parent, master)  # without the console bar's probe

    def on_update(self, val, text):
        pass

    def on_iter_end(self):
        ProgressBar.on_iter_end(self)


class LineMasterBar(ConsoleMasterBar):
    """fastai's console master bar over `LineProgressBar`s: it writes the epoch table, a line an epoch."""

    pcls = LineProgressBar

    def __init__(self, gen, total=None, hide_graph=False, order=None, clean_on_interrupt=False, total_time=False):
        MasterBar.__init__(self, gen, LineProgressBar, total)
        self.total_time = total_time


@contextlib.contextmanager
def epoch_lines() -> Iterator[None]:
    """fastai's progress bars on a terminal; elsewhere (a log file, a pipe) the epoch table alone, a line an epoch."""
    if on_terminal():
        yield
        return
    old = fastai_progress.master_bar, fastai_progress.progress_bar
    fastai_progress.master_bar, fastai_progress.progress_bar = LineMasterBar, LineProgressBar
    try:
        yield
    finally:
        fastai_progress.master_bar, fastai_progress.progress_bar = old
