"""fastai callbacks for training concerns: the best epoch, an average of the weights, a loss that stops being
finite, and speed.

Each is a function returning a fresh callback, to pass to `fit(cbs=...)` for one fit: a learner keeps callbacks
added with `add_cb`, so an exported learner would carry them into any later fit.
"""

from __future__ import annotations

import numpy as np

from .errors import SkinCancerError


# --- the best epoch -----------------------------------------------------------------------------

def best_epoch_tracker(monitor: str, skip_to: int = 0, state=None):
    """fastai's SaveModelCallback (best epoch by `monitor`), keeping the best weights (or `state()`) in memory.

    Writing 100 MB to disk at every improvement cost a quarter of a second per epoch on a GPU, where an epoch
    takes two; the checkpoint callback writes the best weights beside its checkpoint instead. It also ignores
    the epochs a resumed fit skips: fastai still fires after_epoch for them, before the Recorder has any values,
    and SaveModelCallback fails on them (fastai issue #3780). In a distributed run every process tracks the same
    (gathered) metric, so all of them restore the same epoch.
    """
    from fastai.callback.tracker import SaveModelCallback
    from fastai.torch_core import get_model

    class ResumableSaveModel(SaveModelCallback):
        best_state: dict | None = None

        def _save(self, name):
            if state is not None:  # the weights that were validated: an average of them (weight_average)
                self.best_state = state()
                return
            # get_model: the plain module's keys, also while DistributedDataParallel wraps it
            self.best_state = {k: v.detach().clone() for k, v in get_model(self.learn.model).state_dict().items()}

        def after_epoch(self):
            if self.epoch >= skip_to:
                super().after_epoch()

        def after_fit(self, **kwargs):
            if self.best_state is not None:
                get_model(self.learn.model).load_state_dict(self.best_state)
            elif (self.learn.path / self.learn.model_dir / f"{self.fname}.pth").exists():
                super().after_fit(**kwargs)  # a resumed fit with no better epoch: the best saved before it

    return ResumableSaveModel(monitor=monitor, comp=np.greater, fname="best", with_opt=False)


# --- an average of the weights ------------------------------------------------------------------

def weight_average(decay: float, state: dict | None = None):
    """A fastai callback keeping an exponential moving average of the weights, and validating with it.

    After the n-th optimiser step the average moves `1 - d` of the way to the weights, `d = min(decay, (n - 1) / n)`:
    the plain mean of the steps so far until `1 / (1 - decay)` steps, an exponential one after, so the random start
    weighs nothing. BatchNorm's running statistics are averaged too. Validation runs on the average (the weights are
    swapped in, then back), so the epoch's metrics, the best epoch and the exported model are the average's, while
    training goes on from the weights themselves. `averaged_state()` is the average as a state dict; `state` (a
    `checkpoint()` of an interrupted run) continues one.
    """
    import torch
    from fastai.callback.core import Callback
    from fastai.torch_core import get_model

    if not 0 < decay < 1:
        raise SkinCancerError(f"ema: {decay} must be in (0, 1): the average keeps this share of itself at each step")

    class WeightAverage(Callback):
        order = 5  # after ChannelsLast (-1) has converted the model

        def before_fit(self):
            self.model_ = get_model(self.learn.model)
            # the floating-point tensors of the state dict: views of the parameters and buffers (not integer counters)
            self.names = [k for k, v in self.model_.state_dict().items() if v.is_floating_point()]
            self.average = self.saved = None
            self.steps = 0 if state is None else state["steps"]

        def before_train(self):
            values = self.model_.state_dict()  # taken afresh each epoch: a callback may have replaced a tensor
            self.live = [values[k] for k in self.names]
            if self.average is None:  # first epoch this fit trains: from the weights, or the interrupted average
                start = self.live if state is None else [state["average"][k] for k in self.names]
                self.average = [torch.empty_like(t).copy_(s) for t, s in zip(self.live, start)]

        def after_step(self):
            self.steps += 1
            d = min(decay, (self.steps - 1) / self.steps)
            with torch.no_grad():
                torch._foreach_lerp_(self.average, self.live, 1 - d)

        def before_validate(self):
            if self.average is None:
                return
            with torch.no_grad():
                self.saved = [t.clone() for t in self.live]
                torch._foreach_copy_(self.live, self.average)

        def after_validate(self):
            self.restore()

        def after_fit(self):
            self.restore()  # a fit interrupted while validating

        def restore(self):
            if self.saved is not None:
                with torch.no_grad():
                    torch._foreach_copy_(self.live, self.saved)
                self.saved = None

        def averaged_state(self) -> dict:
            """The model's state dict with the average in place of every floating-point tensor."""
            average = dict(zip(self.names, self.average or []))
            return {k: (average[k] if k in average else v).detach().clone()
                    for k, v in self.model_.state_dict().items()}

        def checkpoint(self) -> dict:
            """What `state` needs to continue this average in a resumed fit."""
            return {"steps": self.steps, "average": {k: t.detach().cpu() for k, t in self.averaged_state().items()}}

    return WeightAverage()


# --- a loss that stops being finite -------------------------------------------------------------

def diverged(loss: float, epoch: int, iteration: int) -> SkinCancerError:
    """The error that stops a fit whose loss is no longer finite (0-based epoch and iteration)."""
    return SkinCancerError(f"training diverged: the loss became {loss} at epoch {epoch + 1}, "
                           f"iteration {iteration + 1}; nothing was exported. Try a lower --lr or a smaller --bs.")


def stop_on_nan():
    """A fastai callback that stops training with SkinCancerError when the loss stops being finite."""
    import torch
    from fastai.callback.core import Callback

    class StopOnNaN(Callback):
        order = 60  # after the loss is computed and recorded

        def after_batch(self):
            if self.training and not torch.isfinite(self.loss).all():
                raise diverged(float(self.loss.detach()), self.epoch, self.iter)

    return StopOnNaN()


def loss_on_device():
    """A fastai callback that keeps the smoothed training loss on the device and reads it back one batch late.

    fastai's Recorder copies the smoothed loss to the CPU after every training batch, a host synchronisation: the CPU
    waits for the step to finish before it can queue the next batch's augmentation. Here the smoothing runs on the
    device and each batch's loss is copied back asynchronously, then read when the next batch ends (an epoch's first
    batch at once, its last when the epoch ends): the CPU stays a batch ahead of the GPU. The recorded losses and
    epoch values are fastai's; the progress bar shows the previous batch's. It also does `stop_on_nan`'s work: a loss
    that stops being finite stops training with SkinCancerError naming its epoch and iteration. `restore()` (also
    run after the fit) gives the Recorder fastai's picklable smoothing back.
    """
    import math

    import torch
    from fastai.callback.core import Callback
    from fastai.learner import AvgSmoothLoss
    from fastai.torch_core import to_detach

    def set_smoothing(recorder, smoothing):
        # the Recorder is a Callback, whose setattr warns that learn.smooth_loss is shadowed: this attribute is its own
        object.__setattr__(recorder, "smooth_loss", smoothing)

    class SmoothLossOnDevice(AvgSmoothLoss):
        def accumulate(self, learn):
            self.count += 1
            self.last = to_detach(learn.loss.mean(), cpu=False)  # gathered over processes, as fastai's
            start = torch.zeros_like(self.last) if self.count == 1 else self.val
            self.val = torch.lerp(self.last, start, self.beta)

    class LossOnDevice(Callback):
        order = 55  # after the Recorder (50) smooths the loss, before the progress bar (60) shows it

        def before_fit(self):
            self.fitted = self.learn  # restore() may run after fastai has removed this callback
            self.fastai_smoothing = self.recorder.smooth_loss
            set_smoothing(self.recorder, SmoothLossOnDevice(beta=self.fastai_smoothing.beta))
            self.host = self.event = self.pending = None

        def before_train(self):
            self.pending, self.first_batch = None, True

        def after_batch(self):
            if not self.training or len(self.yb) == 0:
                return
            if self.pending is not None:
                self.read()  # the previous batch's: its step has finished or is about to
            smoothing, losses = self.recorder.smooth_loss, self.recorder.losses
            values = torch.stack([smoothing.last.float(), losses[-1].float()])
            if self.host is None:
                cuda = values.is_cuda
                self.host = torch.empty(2, pin_memory=cuda)
                self.event = torch.cuda.Event() if cuda else None
            self.host.copy_(values, non_blocking=True)
            if self.event is not None:
                self.event.record()
            self.pending = (self.epoch, self.iter, len(losses) - 1)
            if self.first_batch:  # shown at once, and a first loss that is NaN stops training at once
                self.first_batch = False
                self.read()
            self.learn.smooth_loss = self.shown  # the Recorder set this batch's, still on the device

        def after_train(self):
            if self.pending is not None:
                self.read()

        def read(self):
            """The pending batch's loss and smoothed loss: recorded as fastai would, shown, and checked."""
            epoch, iteration, index = self.pending
            self.pending = None
            if self.event is not None:
                self.event.synchronize()
            loss, smoothed = self.host.tolist()
            self.recorder.losses[index] = self.shown = self.learn.smooth_loss = torch.tensor(smoothed)
            if not (math.isfinite(loss) and math.isfinite(smoothed)):
                self.restore()
                raise diverged(loss, epoch, iteration)

        def after_fit(self):
            self.restore()

        def restore(self):
            """Put fastai's smoothing back in the Recorder, with this fit's state, on the CPU."""
            learn = getattr(self, "fitted", None)
            recorder = getattr(learn, "recorder", None)
            if recorder is None or not isinstance(recorder.smooth_loss, SmoothLossOnDevice):
                return
            ours, fastai_smoothing = recorder.smooth_loss, self.fastai_smoothing
            fastai_smoothing.count, fastai_smoothing.val = ours.count, to_detach(ours.val, gather=False)
            set_smoothing(recorder, fastai_smoothing)
            recorder.losses = [to_detach(v, gather=False) for v in recorder.losses]
            learn.smooth_loss = fastai_smoothing.value

    return LossOnDevice()


# --- speed --------------------------------------------------------------------------------------

def compile_model(**kwargs):
    """A fastai callback that trains through torch.compile (static shapes) and validates eagerly.

    Only the training step is compiled: its batches all have one shape (fastai drops the last partial training
    batch), so one graph is built. Compiling validation too would add a graph for gradient-free mode and another
    for the last, smaller validation batch, and PyTorch compiles that one with dynamic shapes, slower for every
    batch after it.
    """
    from fastai.callback.core import Callback
    from fastai.torch_core import get_model

    kwargs.setdefault("dynamic", False)

    class CompileModel(Callback):
        order = -1  # with ChannelsLast, before anything wraps the model

        def before_fit(self):
            self.model_ = get_model(self.learn.model)
            self.model_.compile(**kwargs)
            self.compiled = self.model_._compiled_call_impl

        def before_train(self):
            self.model_._compiled_call_impl = self.compiled

        def before_validate(self):
            self.model_._compiled_call_impl = None  # nn.Module.__call__ runs the plain forward

        def after_fit(self):
            # dropped so the learner can be pickled and predicts eagerly
            self.model_._compiled_call_impl = None
            self.model_ = self.compiled = None

    return CompileModel()
