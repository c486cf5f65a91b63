"""Command line: `python -m skincancer download|train|evaluate|compare|predict|fit-check|export|app ...`.

Each command imports what it needs when it runs (start-up time): `predict` on an .onnx model needs no torch.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time

from . import DISCLAIMER
from .config import (APP_HOST, APP_PORT, CPU_BATCH_PIXELS, MAX_BATCH, MAX_UPLOAD_MB, N_BOOT, add_config_arguments,
                     config_from_arguments)
from .errors import SkinCancerError
from .files import model_files
from .images import image_files

PREDICT_CHUNK = 128  # images decoded and predicted before their results are written (a few seconds on a CPU)
BS_HELP = (f"batch size (default: on a CPU, {CPU_BATCH_PIXELS:,} pixels' worth of the model's input, at most "
           f"{MAX_BATCH}; {MAX_BATCH} on a GPU)")
TRUST_HELP = "unpickle the .pkl (runs code in it) instead of loading the safetensors weights"


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand; `train`'s flags come from TrainConfig's fields."""
    p = argparse.ArgumentParser(prog="python -m skincancer",
                                description="HAM10000 dermoscopy classifier (research tool, not a diagnosis).")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train on a HAM10000 folder and export a learner")
    add_config_arguments(t)
    t.add_argument("--resume", action="store_true",
                   help="continue an interrupted run with the same settings from its last checkpoint")

    e = sub.add_parser("evaluate", help="metrics and plots of a model on held-out labelled images")
    e.add_argument("--model", required=True, help="exported learner (.pkl)")
    _labelled_images_args(e, "evaluate the test split recorded beside the model", "metrics.json and the PNG plots")
    e.add_argument("--prevalence", type=float, nargs="+", metavar="P",
                   help="also give PPV and NPV were P of the people tested malignant (0.05: 5%%), e.g. a clinic's")

    c = sub.add_parser("compare", help="two models on the same held-out images: B - A with paired bootstrap intervals")
    c.add_argument("--models", nargs=2, required=True, metavar=("A", "B"), help="two exported learners (.pkl)")
    _labelled_images_args(c, "compare on the test split both models recorded (train B with --split-from A's)",
                          "comparison.json, comparison.png and comparison_subgroups.png")

    u = sub.add_parser("duplicates", help="photos of one lesion filed under two lesion ids, as a CSV of pairs")
    u.add_argument("--data", required=True, help="data folder (any layout train reads)")
    u.add_argument("--out", help="CSV file to write (default: print it)")
    d = sub.add_parser("download", help="download, verify and extract HAM10000 (the ISIC 2018 Task 3 files)")
    d.add_argument("--dest", required=True, help="folder to put the data in (e.g. data/HAM10000)")
    d.add_argument("--mirror", help="base URL that replaces the ISIC bucket; the file names stay the same")
    d.add_argument("--with-test", action="store_true", help="also the official validation and test sets")

    r = sub.add_parser("predict", help="predict images with an exported model; one JSON object per line")
    r.add_argument("--model", required=True, help="exported model (.pkl, or .onnx without torch)")
    r.add_argument("--bs", type=_positive_int, help=BS_HELP)
    r.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)
    r.add_argument("--lesion", action="store_true",
                   help="the images are photos of one lesion: one call on the mean of their probabilities")
    r.add_argument("--format", choices=("jsonl", "csv"), default="jsonl",
                   help="jsonl (default): one JSON object per image; csv: a header, then one row per image, a column "
                        "per class probability (with --lesion, one row for the lesion, its photos joined by ';')")
    r.add_argument("--no-check", action="store_true",
                   help="call photos that fail the dermoscopy check too (still flagged \"dermoscopy\": false)")
    r.add_argument("images", nargs="+", help="image files, or folders: every image under a folder, in sorted order")

    k = sub.add_parser("fit-check", help="fit the dermoscopy check of an export made without one (docs/predicting.md)")
    k.add_argument("--model", required=True, help="exported learner (.pkl)")
    k.add_argument("--data", required=True, help="the HAM10000 folder it was trained on (its split is beside it)")

    x = sub.add_parser("export", help="the model as ONNX beside it, to predict without torch (docs/serving.md)")
    x.add_argument("--model", required=True, help="exported learner (.pkl)")
    x.add_argument("--format", choices=("onnx",), default="onnx", help="onnx (default): NAME.onnx, fp32")
    x.add_argument("--int8", action="store_true",
                   help="also NAME.int8.onnx, quantized to 8 bits (needs --data): calibrated on training photos, "
                        "checked against fp32 on the validation photos")
    x.add_argument("--data", help="the HAM10000 folder the model was trained on (for --int8)")

    a = sub.add_parser("app", help="serve a local web page (Gradio) to predict uploaded or camera photos")
    a.add_argument("--model", required=True, help="exported model (.pkl, or .onnx without torch)")
    a.add_argument("--host", default=APP_HOST,
                   help=f"address to listen on (default {APP_HOST}: this machine only; 0.0.0.0 opens it to others)")
    a.add_argument("--port", type=_positive_int, default=APP_PORT)
    a.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB, help="largest upload accepted, in MB")
    a.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)
    return p


def _labelled_images_args(parser: argparse.ArgumentParser, data_help: str, writes: str) -> None:
    """The options `evaluate` and `compare` share: which labelled images, how to predict them, where to write."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help=f"HAM10000 folder: {data_help}")
    source.add_argument("--images", help="folder of images labelled by --labels")
    parser.add_argument("--labels", help="ISIC one-hot CSV (image,MEL,NV,...) or image_id,dx CSV, with --images")
    parser.add_argument("--tta", action="store_true", help="fastai test-time augmentation")
    parser.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)
    parser.add_argument("--bs", type=_positive_int, help=BS_HELP)
    parser.add_argument("--bootstrap", type=int, default=N_BOOT,
                        help="bootstrap resamples for the intervals (of lesions where lesion ids are known)")
    parser.add_argument("--out", required=True, help=f"folder for {writes}")


def cmd_duplicates(args) -> int:
    """Run `duplicates`: every pair of photos under two lesion ids that shows one scene."""
    # start-up time
    from .data import read_metadata
    from .duplicates import find_duplicates
    from .files import write_text_atomic

    df = read_metadata(args.data)
    pairs = find_duplicates(df)
    text = pairs.to_csv(index=False)
    if args.out:
        write_text_atomic(args.out, text)
        print(f"{len(pairs)} pair(s) of photos under two lesion ids among {len(df):,} photos: wrote {args.out}")
    else:
        print(text, end="")
    return 0


def cmd_download(args) -> int:
    """Run `download`."""
    # each command imports its modules when it runs: start-up time
    from .download import download

    download(args.dest, mirror=args.mirror, with_test=args.with_test)
    print(f"ready: python -m skincancer train --data {args.dest}")
    return 0


def cmd_train(args) -> int:
    """Run `train` from parsed arguments."""
    # start-up time
    from .train import train

    train(config_from_arguments(args), resume=args.resume)
    return 0


def _labelled(args, model_paths: list[str]):
    """The labelled frame `evaluate` and `compare` score: the models' recorded test split, or --images/--labels."""
    # start-up time
    from .evaluate import read_labels, read_paired_test_split, read_test_split

    if args.images and not args.labels:
        raise SkinCancerError("--images needs --labels (the CSV that names each image's diagnosis)")
    if not args.data:
        return read_labels(args.labels, args.images), args.labels
    df = read_test_split(model_paths[0], args.data) if len(model_paths) == 1 else \
        read_paired_test_split(model_paths[0], model_paths[1], args.data)
    return df, f"the test split of {args.data}"


def cmd_evaluate(args) -> int:
    """Run `evaluate`: write OUT/metrics.json and plots, print the headline tables."""
    # start-up time
    import matplotlib

    matplotlib.use("Agg")  # the command writes PNG files and opens no window
    # start-up time
    from .evaluate import evaluate
    from .predict import load
    from .tables import (lesion_table, metrics_table, prevalence_table, subgroup_table, target_line,
                         threshold_rule_line)

    df, which = _labelled(args, [args.model])
    clf = load(args.model, trusted=args.trust_pickle)
    metrics = evaluate(clf, df, args.out, tta=args.tta, bs=args.bs, n_boot=args.bootstrap,
                       prevalences=args.prevalence or ())
    held_out = f" (every lesion from {metrics['test_source']}, a source training never saw)" \
        if args.data and metrics.get("test_source") else ""
    print(f"{clf.path.name} on {which}{held_out}{' with TTA' if args.tta else ''}:")
    print(metrics_table(metrics))
    print(threshold_rule_line(metrics["threshold_rule"], clf.threshold))
    if metrics.get("target"):
        print(target_line(metrics["target"], "these images"))
    if metrics.get("dermoscopy_check"):
        dc = metrics["dermoscopy_check"]
        auroc = "" if dc["auroc_of_passed"] is None else f"; AUROC of those {dc['auroc_of_passed']:.3f}"
        print(f"dermoscopy check: {dc['passed']:.1%} of the {dc['n']:,} photos pass{auroc} (the metrics above count "
              f"every photo; the {len(dc['refused'])} refused are in metrics.json)")
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


def cmd_compare(args) -> int:
    """Run `compare`: write OUT/comparison.json and its plots, print both models and B - A (by subgroup too)."""
    # start-up time
    import matplotlib

    matplotlib.use("Agg")  # the command writes PNG files and opens no window
    # start-up time
    from .evaluate import compare
    from .predict import load
    from .tables import comparison_table, subgroup_table

    df, which = _labelled(args, args.models)
    clf_a, clf_b = (load(path, trusted=args.trust_pickle) for path in args.models)
    result = compare(clf_a, clf_b, df, args.out, tta=args.tta, bs=args.bs, n_boot=args.bootstrap)
    name_a, name_b = result["names"]
    print(f"B = {name_b} against A = {name_a} on {which}{' with TTA' if args.tta else ''}:")
    print(comparison_table(result))
    if result.get("subgroups"):
        print(f"by subgroup ({name_b} - {name_a}, the malignant call; about twenty intervals, so one may exclude 0 by "
              "chance):")
        print(subgroup_table(result["subgroups"], names=(name_a, name_b)))
    print(f"wrote {args.out}/comparison.json and {', '.join(result['plots'])}")
    print(DISCLAIMER)
    return 0


def result_writer(classes: list[str], fmt: str):
    """A function that prints one `predict` result to stdout as a JSON line, or as a CSV row after a header."""
    if fmt == "jsonl":
        return lambda result: print(json.dumps(result))
    fields = ("call", "label", "malignant_probability", "threshold", "target_sensitivity", "dermoscopy",
              "check_score", "check_threshold", "reason", "error")
    columns = ["image", *fields[:5], *(f"probability_{c}" for c in classes), *fields[5:]]
    writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
    writer.writeheader()

    def write(result: dict) -> None:
        image = result.get("image", ";".join(result.get("lesion", [])))
        row = {k: "" if result.get(k) is None else result[k] for k in fields}
        row.update({f"probability_{c}": p for c, p in result.get("probabilities", {}).items()})
        writer.writerow({**row, "image": image})

    return write


def cmd_predict(args) -> int:
    """Run `predict`: print one JSON line (or CSV row) per image; non-zero exit when any image failed."""
    # start-up time: an .onnx model is served without torch
    from .predict import load

    clf = load(args.model, trusted=args.trust_pickle)
    if clf.check is None:
        print(f"note: {clf.path.name} has no dermoscopy check, so any picture gets a call"
              + (" (an .onnx exported before the check: export it again)" if clf.card.check else
                 f"; add one: python -m skincancer fit-check --model {model_files(clf.path)['model']} --data DIR"),
              file=sys.stderr)
    write = result_writer(clf.classes, args.format)
    images = image_files(args.images)
    check = not args.no_check
    if args.lesion:
        result = clf.predict_lesion(images, bs=args.bs, check=check)
        write(result)
        sys.stdout.flush()
        if "reason" in result:
            print(f"no call: {result['reason']}", file=sys.stderr)
            return 1
        return 0
    # results are written as each chunk is predicted, so a long run shows them (and keeps them if interrupted);
    # progress goes to a terminal's stderr only, never into the results or a log
    progress = sys.stderr.isatty() and len(images) > PREDICT_CHUNK
    failed, refused, done, start = False, 0, 0, time.monotonic()
    for results in clf.predict_chunks(images, bs=args.bs, chunk=PREDICT_CHUNK, check=check):
        for res in results:
            write(res)
            failed |= "error" in res
            refused += "reason" in res
        sys.stdout.flush()
        done += len(results)
        if progress:
            rate = done / max(time.monotonic() - start, 1e-9)
            print(f"\rpredicted {done:,} of {len(images):,} images ({rate:.0f} a second)", end="", file=sys.stderr,
                  flush=True)
    if progress:
        print(file=sys.stderr)
    if refused:
        print(f"{refused} of {len(images)} photo(s) do not look like dermoscopy photos and got no call (see each "
              "one's \"reason\"); --no-check calls them anyway", file=sys.stderr)
    return 1 if failed or refused else 0


def cmd_fit_check(args) -> int:
    """Run `fit-check`: fit the dermoscopy check of an export from its training photos; rewrite its card."""
    # start-up time
    from .dermoscopy import add_check

    card, path = add_check(args.model, args.data)
    assert card.check is not None  # just fitted
    passed = ", ".join(f"{share:.1%} of {split}" for split, share in card.check["passed"].items())
    print(f"wrote {path} and recorded it in {model_files(args.model)['card'].name}: the check passes {passed} photos")
    if card.onnx:
        print(f"export the .onnx copies again for them to check too: python -m skincancer export --model {args.model}")
    return 0


def cmd_export(args) -> int:
    """Run `export`: write NAME.onnx (and NAME.int8.onnx) beside the model and record them in its card."""
    # start-up time
    from .onnx_export import export_onnx
    from .card import read_card

    written = export_onnx(args.model, int8=args.int8, data=args.data)
    onnx = read_card(args.model).onnx
    gap = onnx["onnx"]["largest_difference_from_fastai"]
    print(f"wrote {written['onnx']} (fp32; its probabilities within {gap:.1e} of the fastai model's) and recorded it "
          f"in {model_files(args.model)['card'].name}")
    if "int8" in written:
        q = onnx["int8"]
        print(f"wrote {written['int8']} (int8), checked on {q['valid_images']:,} validation photos: AUROC "
              f"{q['valid_auroc_fp32']:.4f} in fp32, {q['valid_auroc_int8']:.4f} in int8; the probability of "
              f"malignancy moved by {q['mean_probability_change']:.4f} on average, "
              f"{q['largest_probability_change']:.4f} at most")
        print(f"  at the threshold: {q['calls_flipped']:.1%} of the calls flipped; sensitivity "
              f"{q['valid_sensitivity_fp32']:.3f} in fp32, {q['valid_sensitivity_int8']:.3f} in int8")
        if not q["holds"]:
            tol = q["tolerance"]
            print(f"WARNING: int8 strays from fp32 by more than {tol['auroc_drop']} validation AUROC or "
                  f"{tol['calls_flipped']:.0%} of the calls: serve the fp32 model, {written['onnx'].name}, instead",
                  file=sys.stderr)
    best = written["int8"] if "int8" in written and onnx["int8"]["holds"] else written["onnx"]
    print(f"next: python -m skincancer predict --model {best} PHOTO.jpg   (numpy, Pillow and onnxruntime suffice: "
          "docs/serving.md)")
    return 0


def cmd_app(args) -> int:
    """Run `app`: serve the web page until interrupted."""
    # start-up time
    from .app import serve

    serve(args.model, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb, trusted=args.trust_pickle)
    return 0


COMMANDS = {"duplicates": cmd_duplicates,
            "download": cmd_download, "train": cmd_train, "evaluate": cmd_evaluate, "compare": cmd_compare,
            "predict": cmd_predict, "fit-check": cmd_fit_check, "export": cmd_export, "app": cmd_app}


def main(argv: list[str] | None = None) -> int:
    """Entry point; bad input prints `error: ...` and returns 2 instead of a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SkinCancerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # a serve-only install (docs/serving.md) runs `predict` on .onnx models alone
        print(f"error: `{args.command}` needs {e.name}, which this environment lacks: the full install has it "
              "(make install, or pip install -r requirements.txt)"
              + ("; an .onnx export is served without it" if args.command in ("predict", "app") else ""),
              file=sys.stderr)
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
