"""Data-parallel training over several processes (GPUs or machines) with fastai's DistributedTrainer and Accelerate.

`accelerate launch -m skincancer train ...` (or `torchrun`) starts one process per GPU; each sets RANK and
WORLD_SIZE, which fastai's `rank_distrib`/`num_distrib` read. Every process builds the same split, DataLoaders and
learner; during `fit` the model is wrapped in DistributedDataParallel and each process trains on its own share of
every epoch. Only the main process (rank 0) writes files and prints.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from fastai.distributed import DistributedDL, DistributedTrainer
from fastai.torch_core import num_distrib, rank_distrib

from .errors import SkinCancerError

T = TypeVar("T")


def world_size() -> int:
    """How many processes train together (1 when not launched distributed)."""
    return max(num_distrib(), 1)


def is_main_process() -> bool:
    """Whether this process writes files and prints: rank 0, or the only process."""
    return rank_distrib() == 0


@contextlib.contextmanager
def quiet_unless_main() -> Iterator[None]:
    """A context that discards what the other processes of a distributed run print (their errors still show)."""
    if is_main_process():
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def from_main_process(fn: Callable[[], T]) -> T:
    """`fn()` computed by the main process alone and sent to the others; a SkinCancerError it raises, raised on all.

    For what every process must agree on, read from files another process may still be writing (a resumed run's
    progress): processes that disagree on where to start would wait for each other forever.
    """
    if world_size() <= 1:
        return fn()
    box: list = [None]
    if is_main_process():
        try:
            box[0] = ("value", fn())
        except SkinCancerError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise SkinCancerError(value)
    return value


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Run as if this process had trained alone, for work only the main process does after fitting (evaluation).

    fastai all-gathers predictions across processes whenever WORLD_SIZE says there are several, which would wait
    forever for processes that are not predicting.
    """
    old = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = old


def process_state():
    """Accelerate's PartialState, set up on this process's device (gloo on CPUs), or None with one process.

    It must exist before any DataLoader is built: it picks this process's GPU, and fastai's `default_device`
    follows it.
    """
    if world_size() <= 1:
        return None
    try:
        from accelerate import PartialState  # only a launched distributed run needs Accelerate
    except ImportError:
        raise SkinCancerError("training on several processes needs Hugging Face Accelerate: pip install accelerate") \
            from None
    return PartialState(cpu=not torch.cuda.is_available())


def local_main_process_first() -> contextlib.AbstractContextManager:
    """A context that the first process of each machine runs first, the others of that machine after it.

    For work each machine needs once, such as building the presized cache on its own disk.
    """
    state = process_state()
    return state.local_main_process_first() if state is not None else contextlib.nullcontext()


class BroadcastDL(DistributedDL):
    """fastai's DistributedDL, whose per-epoch sample order is broadcast as a CPU tensor on gloo (CPUs)."""

    def _broadcast(self, t, rank):
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor(t, dtype=torch.long, device=device)
        dist.broadcast(t, rank)
        return t.cpu().tolist()


class DataParallel(DistributedTrainer):
    """fastai's DistributedTrainer with gloo-safe broadcasts, giving the plain model back after the fit.

    SyncBatchNorm is off by default: each GPU's batch (64 or more in our recipes) gives sound statistics,
    SyncBatchNorm adds an all-reduce per layer per step, and it does not run on CPUs.
    """

    def __init__(self, sync_bn: bool = False, **kwargs):
        kwargs.setdefault("cpu", not torch.cuda.is_available())
        super().__init__(sync_bn=sync_bn, **kwargs)

    def before_fit(self):
        self.plain_model = self.learn.model
        super().before_fit()

    def after_fit(self):
        super().after_fit()
        # with sync_bn the trained model is a copy with SyncBatchNorm layers that share the plain model's
        # tensors; the plain one keeps the layers a single process has, so exports look the same
        self.learn.model = self.plain_model

    def _wrap_dl(self, dl):
        return dl if isinstance(dl, DistributedDL) else BroadcastDL(dl, device=self.learn.model.device)


@contextlib.contextmanager
def distributed_fit(learn) -> Iterator[list]:
    """Yield the callbacks that make `learn.fit` data-parallel (none with one process); no progress bar off rank 0.

    Pass them to each `fit(cbs=...)` rather than adding them to the learner, so an exported learner never carries
    them. `learn.distrib_ctx()` is fastai's equivalent for notebooks on GPUs.
    """
    if world_size() <= 1:
        yield []
        return
    process_state()
    hidden = [] if is_main_process() or not hasattr(learn, "progress") else [learn.progress]
    with learn.removed_cbs(hidden):
        yield [DataParallel()]
