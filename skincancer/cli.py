"""Command line: `python -m skincancer download|train|evaluate|compare|predict|app ...`."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
import warnings
from pathlib import Path

from .errors import SkinCancerError

PREDICT_CHUNK = 128  # images decoded and predicted before their JSON lines are written (a few seconds on a CPU)
BS_HELP = "batch size (default: on a CPU by the model's input size, 8 images at 224 px and 64 at 64 px; 64 on a GPU)"


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    from .data import AUGMENTS, TASKS
    from .train import IMBALANCE

    p = argparse.ArgumentParser(prog="python -m skincancer",
                                description="HAM10000 dermoscopy classifier (research tool, not a diagnosis).")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train on a HAM10000 folder and export a learner")
    t.add_argument("--data", required=True, help="HAM10000 folder (metadata CSV and images anywhere below it)")
    t.add_argument("--task", choices=TASKS, default="binary", help="benign/malignant or the 7 diagnoses")
    t.add_argument("--arch", default="resnet50", help="torchvision or timm architecture name")
    t.add_argument("--epochs", type=_positive_int, help="default: the recipe's (fine-tuning or from scratch)")
    t.add_argument("--size", type=_positive_int, help="final image size in pixels (default: the recipe's)")
    t.add_argument("--presize", type=_positive_int, help="item resize before GPU augmentation (default 1.5x size)")
    t.add_argument("--bs", type=_positive_int, help="batch size (default: the recipe's)")
    t.add_argument("--lr", type=float, help="peak one-cycle learning rate (default: the recipe's)")
    t.add_argument("--wd", type=float, help="AdamW weight decay (default: fastai's, 0.01)")
    t.add_argument("--seed", type=int, default=42, help="seed for the split, sampling and training")
    t.add_argument("--limit", type=_positive_int, help="train on a label-stratified sample of about N images")
    t.add_argument("--imbalance", choices=IMBALANCE, default="loss",
                   help="class-weighted loss (default), balanced sampling, or none")
    t.add_argument("--label-smoothing", type=float, help="default: the recipe's")
    t.add_argument("--mixup", type=float, help="MixUp Beta alpha, 0 for none (default: the recipe's)")
    t.add_argument("--ema", type=float, help="validate and export an exponential moving average of the weights with "
                                             "this decay per step, e.g. 0.99 (default: the recipe's, 0: none)")
    t.add_argument("--augment", choices=AUGMENTS, default="two-pass",
                   help="two-pass: fastai's aug_transforms with a random crop (default); one-pass: the crop folded "
                        "into the zoom, one resample at the final size")
    t.add_argument("--target-sensitivity", type=float, default=0.90,
                   help="the operating threshold is chosen on the validation split to reach this sensitivity")
    t.add_argument("--split-from", help="a model's NAME.split.csv: train, validate and test on the images and "
                                        "split recorded there (to compare models on the same test images)")
    t.add_argument("--valid-pct", type=float, default=0.15)
    t.add_argument("--test-pct", type=float, default=0.15)
    t.add_argument("--drop-missing", action="store_true", help="drop (with a warning) images missing on disk")
    t.add_argument("--class-map", help="JSON file mapping class folder names to diagnoses (folder-per-class sets)")
    t.add_argument("--workers", type=int, help="DataLoader worker processes with --no-cache (default: fastai's)")
    t.add_argument("--no-cache", dest="cache", action="store_false",
                   help="decode files every epoch instead of training from the presized image cache")
    t.add_argument("--cache-dir", help="where presized caches live (default: $SKINCANCER_CACHE or "
                                       "~/.cache/skincancer)")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the training step: ~30 s to compile; on one H100 it paid at 224 px (with "
                        "--augment one-pass) after ~30 epochs and was slower at 128 px (README: Speed)")
    t.add_argument("--loss-on-device", action="store_true",
                   help="keep the smoothed training loss on the GPU and read it a batch late, so the CPU is not held "
                        "at every batch (not yet measured on a GPU; README: Speed)")
    t.add_argument("--no-reproducible", dest="reproducible", action="store_false",
                   help="let cuDNN time its algorithms and use non-deterministic ones: perhaps faster on a GPU, but "
                        "two runs with one seed can differ (not yet measured; README: Speed)")
    t.add_argument("--checkpoint-every", type=float, default=60.0,
                   help="seconds between resumable checkpoints (0: after every epoch)")
    t.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                   help="start from random weights instead of ImageNet")
    t.add_argument("--out", default="models/skincancer.pkl", help="where to export the learner (.pkl)")
    t.add_argument("--resume", action="store_true",
                   help="continue an interrupted run with the same settings from its last epoch checkpoint")

    e = sub.add_parser("evaluate", help="metrics and plots of a model on held-out labelled images")
    e.add_argument("--model", required=True, help="exported learner (.pkl)")
    _labelled_images_args(e, "evaluate the test split recorded beside the model", "metrics.json and the PNG plots")
    e.add_argument("--prevalence", type=float, nargs="+", metavar="P",
                   help="also give PPV and NPV were P of the people tested malignant (0.05: 5%%), e.g. a clinic's")

    c = sub.add_parser("compare", help="two models on the same held-out images: B - A with paired bootstrap intervals")
    c.add_argument("--models", nargs=2, required=True, metavar=("A", "B"), help="two exported learners (.pkl)")
    _labelled_images_args(c, "compare on the test split both models recorded (train B with --split-from A's)",
                          "comparison.json, comparison.png and comparison_subgroups.png")

    d = sub.add_parser("download", help="download, verify and extract HAM10000 (the ISIC 2018 Task 3 files)")
    d.add_argument("--dest", required=True, help="folder to put the data in (e.g. data/HAM10000)")
    d.add_argument("--mirror", help="base URL that replaces the ISIC bucket; the file names stay the same")
    d.add_argument("--with-test", action="store_true", help="also the official validation and test sets")

    r = sub.add_parser("predict", help="predict images with an exported learner; one JSON object per line")
    r.add_argument("--model", required=True, help="exported learner (.pkl)")
    r.add_argument("--bs", type=_positive_int, help=BS_HELP)
    r.add_argument("--trust-pickle", action="store_true",
                   help="unpickle the .pkl (runs code in it) instead of loading the safetensors weights")
    r.add_argument("--lesion", action="store_true",
                   help="the images are photos of one lesion: one call on the mean of their probabilities")
    r.add_argument("--format", choices=("jsonl", "csv"), default="jsonl",
                   help="jsonl (default): one JSON object per image; csv: a header, then one row per image, a column "
                        "per class probability (with --lesion, one row for the lesion, its photos joined by ';')")
    r.add_argument("images", nargs="+", help="image files, or folders: every image under a folder, in sorted order")

    a = sub.add_parser("app", help="serve a local web page (Gradio) to predict uploaded or camera photos")
    a.add_argument("--model", required=True, help="exported learner (.pkl)")
    a.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to others)")
    a.add_argument("--port", type=_positive_int, default=7860)
    a.add_argument("--max-upload-mb", type=float, default=10.0, help="largest upload accepted, in MB")
    a.add_argument("--trust-pickle", action="store_true",
                   help="unpickle the .pkl (runs code in it) instead of loading the safetensors weights")
    return p


def _labelled_images_args(parser: argparse.ArgumentParser, data_help: str, writes: str) -> None:
    """The options `evaluate` and `compare` share: which labelled images, how to predict them, where to write."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help=f"HAM10000 folder: {data_help}")
    source.add_argument("--images", help="folder of images labelled by --labels")
    parser.add_argument("--labels", help="ISIC one-hot CSV (image,MEL,NV,...) or image_id,dx CSV, with --images")
    parser.add_argument("--tta", action="store_true", help="fastai test-time augmentation")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="unpickle the .pkl (runs code in it) instead of loading the safetensors weights")
    parser.add_argument("--bs", type=_positive_int, help=BS_HELP)
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="bootstrap resamples for the intervals (of lesions where lesion ids are known)")
    parser.add_argument("--out", required=True, help=f"folder for {writes}")


def read_class_map(path: str | None) -> dict[str, str] | None:
    """The --class-map JSON file as a dict, or None."""
    if path is None:
        return None
    try:
        mapping = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SkinCancerError(f"{path}: not a readable JSON class map ({e})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise SkinCancerError(f"{path}: expected a JSON object of class folder name -> diagnosis")
    return mapping


def cmd_download(args) -> int:
    """Run `download`."""
    from .download import download

    download(args.dest, mirror=args.mirror, with_test=args.with_test)
    print(f"ready: python -m skincancer train --data {args.dest}")
    return 0


def cmd_train(args) -> int:
    """Run `train` from parsed arguments."""
    from .train import TrainConfig, train

    config = TrainConfig(data=args.data, task=args.task, arch=args.arch, pretrained=args.pretrained,
                         epochs=args.epochs, size=args.size, presize=args.presize, bs=args.bs, lr=args.lr,
                         wd=args.wd,
                         imbalance=args.imbalance, label_smoothing=args.label_smoothing, mixup=args.mixup,
                         ema=args.ema,
                         augment=args.augment,
                         seed=args.seed, cache=args.cache, cache_dir=args.cache_dir, compile=args.compile,
                         loss_on_device=args.loss_on_device, reproducible=args.reproducible,
                         checkpoint_every=args.checkpoint_every,
                         target_sensitivity=args.target_sensitivity,
                         valid_pct=args.valid_pct, test_pct=args.test_pct, limit=args.limit,
                         split_from=args.split_from,
                         drop_missing=args.drop_missing, class_map=read_class_map(args.class_map),
                         num_workers=args.workers, out=args.out)
    train(config, resume=args.resume)
    return 0


def cmd_evaluate(args) -> int:
    """Run `evaluate`: write OUT/metrics.json and plots, print the headline table."""
    import matplotlib

    matplotlib.use("Agg")  # the command writes PNG files and opens no window
    from .evaluate import (evaluate, lesion_table, metrics_table, prevalence_table, read_labels, read_test_split,
                           subgroup_table)
    from .predict import DISCLAIMER, load

    _check_labels(args)
    clf = load(args.model, trusted=args.trust_pickle)
    df = read_test_split(args.model, args.data) if args.data else read_labels(args.labels, args.images)
    metrics = evaluate(clf, df, args.out, tta=args.tta, bs=args.bs, n_boot=args.bootstrap,
                       prevalences=args.prevalence or ())
    which = "test split of " + args.data if args.data else args.labels
    print(f"{clf.path.name} on {which}{' with TTA' if args.tta else ''}:")
    print(metrics_table(metrics))
    print(f"threshold rule: {metrics['threshold_rule']}")
    if metrics.get("net_benefit"):
        nb = metrics["net_benefit"]
        print(f"net benefit at the threshold (finding a malignancy worth {nb['benign_per_malignancy']:.1f} benign "
              f"biopsies): {nb['model']:.4f} a person; biopsy all: {nb['biopsy_all']:.4f}; biopsy none: 0")
    if metrics.get("by_lesion"):
        print(lesion_table(metrics["by_lesion"]))
    if metrics.get("at_prevalence"):
        print("at other prevalences (the malignant call; Bayes' rule on sensitivity and specificity):")
        print(prevalence_table(metrics["at_prevalence"]))
    if metrics.get("subgroups"):
        print("by subgroup (the malignant call):")
        print(subgroup_table(metrics["subgroups"]))
    print(f"wrote {args.out}/metrics.json and {', '.join(metrics['plots'])}")
    print(DISCLAIMER)
    return 0


def _check_labels(args) -> None:
    if args.images and not args.labels:
        raise SkinCancerError("--images needs --labels (the CSV that names each image's diagnosis)")


def cmd_compare(args) -> int:
    """Run `compare`: write OUT/comparison.json and its plots, print both models and B - A (by subgroup too)."""
    import matplotlib

    matplotlib.use("Agg")
    from .evaluate import compare, comparison_table, read_labels, read_paired_test_split, subgroup_table
    from .predict import DISCLAIMER, load

    _check_labels(args)
    model_a, model_b = args.models
    df = read_paired_test_split(model_a, model_b, args.data) if args.data else read_labels(args.labels, args.images)
    clf_a, clf_b = load(model_a, trusted=args.trust_pickle), load(model_b, trusted=args.trust_pickle)
    result = compare(clf_a, clf_b, df, args.out, tta=args.tta, bs=args.bs, n_boot=args.bootstrap)
    which = "the test split of " + args.data if args.data else args.labels
    print(f"B = {clf_b.path.name} against A = {clf_a.path.name} on {which}{' with TTA' if args.tta else ''}:")
    print(comparison_table(result))
    if result.get("subgroups"):
        print("by subgroup (B - A, the malignant call; about twenty intervals, so one may exclude 0 by chance):")
        print(subgroup_table(result["subgroups"], difference=True))
    print(f"wrote {args.out}/comparison.json and {', '.join(result['plots'])}")
    print(DISCLAIMER)
    return 0


def expand_folders(paths: list[str]) -> list[str]:
    """`paths` with each folder replaced by the image files under it (fastai's `get_image_files`), sorted."""
    from fastai.data.transforms import get_image_files

    out = []
    for path in paths:
        found = sorted(map(str, get_image_files(path))) if Path(path).is_dir() else []
        out += found or [path]  # a folder without images stays, and its result says what it is
    return out


def result_writer(classes: list[str], fmt: str):
    """A function that prints one `predict` result to stdout as a JSON line, or as a CSV row after a header."""
    if fmt == "jsonl":
        return lambda result: print(json.dumps(result))
    import csv

    columns = ["image", "call", "label", "malignant_probability", *(f"probability_{c}" for c in classes), "error"]
    writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
    writer.writeheader()

    def write(result: dict) -> None:
        image = result.get("image", ";".join(result.get("lesion", [])))
        row = {k: result.get(k, "") for k in ("call", "label", "malignant_probability", "error")}
        row.update({f"probability_{c}": p for c, p in result.get("probabilities", {}).items()})
        writer.writerow({**row, "image": image})

    return write


def cmd_predict(args) -> int:
    """Run `predict`: print one JSON line (or CSV row) per image; non-zero exit when any image failed."""
    from .predict import load

    clf = load(args.model, trusted=args.trust_pickle)
    write = result_writer(clf.classes, args.format)
    if args.lesion:
        write(clf.predict_lesion(expand_folders(args.images), bs=args.bs))
        sys.stdout.flush()
        return 0
    images = expand_folders(args.images)
    # results are written as each chunk is predicted, so a long run shows them (and keeps them if interrupted);
    # progress goes to a terminal's stderr only, never into the results or a log
    progress = sys.stderr.isatty() and len(images) > PREDICT_CHUNK
    failed, done, start = False, 0, time.monotonic()
    for results in clf.predict_chunks(images, bs=args.bs, chunk=PREDICT_CHUNK):
        for res in results:
            write(res)
            failed |= "error" in res
        sys.stdout.flush()
        done += len(results)
        if progress:
            rate = done / max(time.monotonic() - start, 1e-9)
            print(f"\rpredicted {done:,} of {len(images):,} images ({rate:.0f} a second)", end="", file=sys.stderr,
                  flush=True)
    if progress:
        print(file=sys.stderr)
    return 1 if failed else 0


def cmd_app(args) -> int:
    """Run `app`: serve the web page until interrupted."""
    from .app import serve

    serve(args.model, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, trusted=args.trust_pickle)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input prints `error: ...` and returns 2 instead of a traceback."""
    args = build_parser().parse_args(argv)
    # fastai's import-time use of torch.jit.script is not ours to fix and only confuses CLI users
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)
    try:
        return {"download": cmd_download, "train": cmd_train, "evaluate": cmd_evaluate,
                "compare": cmd_compare, "predict": cmd_predict, "app": cmd_app}[args.command](args)
    except SkinCancerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `predict ... | head`: the reader took what it wanted and left; no traceback for that
        try:  # the interpreter flushes stdout at exit, which would fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):
            pass
        return 1
