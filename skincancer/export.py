"""What an export writes: the fastai learner (.pkl), its weights (.safetensors), the model card (.json) with every
file's sha256, and the split (.split.csv); each atomically, so a failure keeps the previous files. The ONNX copies are
onnx_export.py's."""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pandas as pd
from fastcore.foundation import L

from .augment import with_fastai_classes
from .card import ModelCard
from .check import DermoscopyCheck
from .dermoscopy import check_record, write_check
from .files import atomic_path, model_files, sha256_file, write_json_atomic
from .rebuild import save_weights


@contextmanager
def as_fastai_export(learn):
    """The learner as a fastai user's own export holds it, while in the block: fastai's batch transforms in place of
    ours and no metrics (training's only), so its pickle names no class of ours built on a fastai private one."""
    pipelines = [dl.after_batch for dl in learn.dls.loaders]
    saved_fs, saved_metrics = [p.fs for p in pipelines], learn.metrics
    try:
        for p in pipelines:
            p.fs = L(with_fastai_classes(p.fs))
        learn.metrics = L()  # the recorder reads them from here too
        yield learn
    finally:
        for p, fs in zip(pipelines, saved_fs):
            p.fs = fs
        learn.metrics = saved_metrics


def export(learn, out: str | Path, card: ModelCard, df: pd.DataFrame,
           check: tuple[DermoscopyCheck, dict] | None = None) -> tuple[dict[str, Path], ModelCard]:
    """Write the learner, weights, split, the dermoscopy check (`fit_dermoscopy_check`'s, if given) and then the card
    naming their sha256; return the paths written and the card as written."""
    paths = model_files(out)
    roles = ["model", "weights", "card", "split", *(["check"] if check else [])]
    learn = learn.to_fp32() if hasattr(learn, "to_fp32") else learn
    with ExitStack() as files:
        tmp = {role: files.enter_context(atomic_path(paths[role])) for role in roles if role != "card"}
        with as_fastai_export(learn):
            learn.export(tmp["model"].resolve())
        save_weights(learn.model, tmp["weights"])
        df[["image_id", "lesion_id", "split"]].to_csv(tmp["split"], index=False)
        record = None
        if check:
            write_check(check[0], tmp["check"])
            record = check_record(*check, tmp["check"], paths["check"].name)
        card = dataclasses.replace(card, sha256=sha256_file(tmp["model"]), weights_sha256=sha256_file(tmp["weights"]),
                                   split_sha256=sha256_file(tmp["split"]), check=record,
                                   files={k: paths[k].name for k in roles})
        # the card is written last and names the sha256 of the files beside it: a mismatch exposes a torn export
    if not check:  # a check left by an earlier export beside it is not this model's
        paths["check"].unlink(missing_ok=True)
    write_json_atomic(paths["card"], card.to_dict())
    return {k: paths[k] for k in roles}, card
