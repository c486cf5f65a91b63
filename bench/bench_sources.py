"""How much a recipe loses at a clinic it never saw: each source held out as the test split, against a random
lesion split with a test split of the same share of lesions, trained alike; the operating threshold's rules compared.

    python bench/bench_sources.py --data DIR --weights LITE0_FILE          # cpu recipe: rosendahl, vidir_modern
    python bench/bench_sources.py --data DIR --weights FILE --sources rosendahl --runs heldout
    python bench/bench_sources.py --data DIR --weights FILE --seeds 42 1 2 # the recipe as is, once per seed
    python bench/bench_sources.py --report runs.jsonl                      # the CSV again from recorded runs
    python bench/bench_sources.py --smoke                                  # seconds on a CPU; CI runs it

Each training appends a line to --jsonl (its settings, wall time and each split's truth, calibrated probability and
lesion ids), so an interrupted benchmark keeps what it finished and a run already recorded is not trained again.
The CSV (--csv) then holds, per run and threshold rule, the test split's AUROC and the sensitivity and specificity
at the threshold the rule chose on valid, each with a 95% interval over resampled lesions. The valid split chooses,
the test split (the held-out source) only measures. Rules: `plain` (valid reaches the target exactly) and
`confident` (the lower 95% bound of valid's sensitivity reaches it, `choose_confident_threshold`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, SHARED
from sklearn.metrics import roc_auc_score

from skincancer.config import N_BOOT, TARGET_SENSITIVITY, TEST_PCT, VALID_PCT, TrainConfig
from skincancer.data import SOURCE_COLUMN, add_labels, read_metadata, sample_by_label
from skincancer.files import write_text_atomic
from skincancer.metrics import bootstrap_intervals, choose_confident_threshold, choose_threshold

SOURCES = ("rosendahl", "vidir_modern")  # the two sources that hold every diagnosis
KINDS = ("heldout", "random")
STANDARD = "standard"  # the recipe as the README trains it (a random lesion split, no source held out): --seeds
RULES = ("plain", "confident")
COLUMNS = ("run", "recipe", "seed", "split", "source", "rule", "threshold", "train_images", "test_images",
           "test_lesions", "test_malignant", "valid_auroc", "test_auroc", "test_auroc_lo", "test_auroc_hi",
           "sensitivity", "sensitivity_lo", "sensitivity_hi", "specificity", "specificity_lo", "specificity_hi",
           "train_minutes")


def lesion_share(data: str, source: str, limit: int | None = None, seed: int = 42) -> float:
    """The share of the lesions trained on (all, or `limit`'s sample) with a photo from `source`: the test share of
    its random counterpart."""
    df = read_metadata(data)
    if limit:
        df = sample_by_label(add_labels(df, "binary"), limit, seed=seed)
    return df.loc[df[SOURCE_COLUMN] == source, "lesion_id"].nunique() / df["lesion_id"].nunique()


def run_config(kind: str, source: str, data: str, overrides: dict, workdir: Path) -> TrainConfig:
    """The TrainConfig of one run: `source` held out, or a random lesion split whose test takes as many lesions."""
    out = str(Path(tempfile.mkdtemp(dir=workdir)) / f"{kind}_{source}.pkl")
    if kind == STANDARD:
        split: dict = {}
    elif kind == "heldout":
        split = dict(test_source=source)
    else:  # valid keeps its share of the non-test lesions, as with a held-out source
        share = lesion_share(data, source, overrides.get("limit"), overrides.get("seed", 42))
        split = dict(test_pct=share, valid_pct=VALID_PCT / (1 - TEST_PCT) * (1 - share))
    return TrainConfig(data=data, out=out, **{**overrides, **split})


def train_run(name: str, config: TrainConfig) -> dict:
    """Train one run and return its record: settings, wall time, and each split's truth, probability and lesions."""
    from skincancer.train import train  # here: --report needs no training stack

    start = time.perf_counter()
    result = train(config)
    minutes = (time.perf_counter() - start) / 60
    card = result.card
    assert card is not None  # one process: it exported
    record = {"run": name, "recipe": card.recipe, "seed": config.seed, "train_minutes": minutes,
              "train_images": (card.split_images or {})["train"], "card_threshold": card.threshold}
    for split, (truth, p) in result.scores.items():
        part = result.df[result.df["split"] == split]
        record[split] = {"truth": truth.astype(int).tolist(), "p": p.tolist(), "lesion": part["lesion_id"].tolist()}
    return record


def rule_threshold(rule: str, valid: dict, target: float) -> float:
    """The operating threshold `rule` chooses on the valid split's record."""
    p, y = np.asarray(valid["p"]), np.asarray(valid["truth"], dtype=bool)
    if rule == "plain":
        return choose_threshold(p, y, target)
    return choose_confident_threshold(p, y, target, groups=valid["lesion"])


def rows(record: dict, target: float, n_boot: int = N_BOOT) -> list[dict]:
    """The CSV rows of one recorded run: one per threshold rule."""
    valid, test = record["valid"], record["test"]
    y, p = np.asarray(test["truth"], dtype=bool), np.asarray(test["p"])
    valid_auroc, auroc = float(roc_auc_score(valid["truth"], valid["p"])), float(roc_auc_score(y, p))
    out = []
    for rule in RULES:
        t = rule_threshold(rule, valid, target)
        said = p >= t
        ci = bootstrap_intervals(y, p, t, n_boot, groups=test["lesion"])
        out.append({"run": record["run"], "recipe": record["recipe"], "seed": record["seed"],
                    "split": record["run"].split(":")[0], "source": record["run"].split(":")[1], "rule": rule,
                    "threshold": round(t, 5),
                    "train_images": record["train_images"], "test_images": len(y),
                    "test_lesions": len(set(test["lesion"])), "test_malignant": int(y.sum()),
                    "valid_auroc": round(valid_auroc, 4), "test_auroc": round(auroc, 4),
                    "test_auroc_lo": round(ci["auroc"][0], 4), "test_auroc_hi": round(ci["auroc"][1], 4),
                    "sensitivity": round(float(said[y].mean()), 4),
                    "sensitivity_lo": round(ci["sensitivity"][0], 4), "sensitivity_hi": round(ci["sensitivity"][1], 4),
                    "specificity": round(float((~said[~y]).mean()), 4),
                    "specificity_lo": round(ci["specificity"][0], 4), "specificity_hi": round(ci["specificity"][1], 4),
                    "train_minutes": round(record["train_minutes"], 1)})
    return out


def read_records(path: Path) -> list[dict]:
    """The runs recorded in a JSON-lines file, in order (none if it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_csv(records: list[dict], path: Path, target: float, n_boot: int = N_BOOT) -> list[dict]:
    """Every recorded run's rows, written to `path` atomically; returns them."""
    table = [row for record in records for row in rows(record, target, n_boot)]
    lines = [",".join(COLUMNS)] + [",".join(str(r[c]) for c in COLUMNS) for r in table]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return table


def print_table(table: list[dict]) -> None:
    """The CSV's rows as aligned lines, and the standard recipe's test AUROC over its seeds."""
    print(f"{'run':<30}{'rule':<11}{'test AUROC (95% CI)':<24}{'sensitivity (95% CI)':<24}{'specificity':>12}")
    for r in table:
        print(f"{r['run']:<30}{r['rule']:<11}"
              f"{r['test_auroc']:.3f} ({r['test_auroc_lo']:.3f}-{r['test_auroc_hi']:.3f})    "
              f"{r['sensitivity']:.3f} ({r['sensitivity_lo']:.3f}-{r['sensitivity_hi']:.3f})    "
              f"{r['specificity']:>8.3f}")
    for rule, figures in spread(table).items():
        trainings = figures.pop("trainings")
        print(f"standard recipe over {trainings} seeds, {rule} threshold (mean ± SD): " + ", ".join(
            f"{k.replace('_', ' ')} {m:.3f} ± {sd:.3f}" for k, (m, sd) in figures.items()))


def spread(table: list[dict]) -> dict[str, dict]:
    """Per threshold rule, the standard recipe's test figures as (mean, SD) over its seeds, where it has several."""
    out = {}
    for rule in RULES:
        runs = [r for r in table if r["split"] == STANDARD and r["rule"] == rule]
        if len(runs) < 2:
            continue
        figures: dict = {"trainings": len(runs)}
        for key in ("test_auroc", "sensitivity", "specificity", "balanced_accuracy"):
            values = [(r["sensitivity"] + r["specificity"]) / 2 if key == "balanced_accuracy" else r[key] for r in runs]
            figures[key] = (float(np.mean(values)), float(np.std(values, ddof=1)))
        out[rule] = figures
    return out


def main(argv: list[str] | None = None) -> None:
    """Train the runs not yet recorded, then write and print the CSV."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(SHARED / "ham10000_200x150"))
    parser.add_argument("--weights", help="EfficientNet-Lite0 ImageNet weights (the cpu recipe's starting point)")
    parser.add_argument("--recipe", default="cpu")
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument("--runs", default=",".join(KINDS), help="heldout, random or both")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                        help="train the standard recipe once per seed instead (its spread across trainings)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="TrainConfig overrides (JSON values)")
    parser.add_argument("--jsonl", default=str(ROOT / "reports" / "bench_sources.jsonl"))
    parser.add_argument("--csv", default=str(ROOT / "docs" / "results" / "source_heldout_cpu.csv"))
    parser.add_argument("--report", metavar="JSONL", help="train nothing: the CSV from these recorded runs")
    parser.add_argument("--smoke", action="store_true", help="tiny runs into a temporary folder")
    args = parser.parse_args(argv)
    target = TARGET_SENSITIVITY
    if args.report:
        print_table(write_csv(read_records(Path(args.report)), Path(args.csv), target))
        return
    overrides: dict = {"recipe": args.recipe, "seed": args.seed}
    if args.weights:
        overrides["weights"] = args.weights
    for pair in args.set:
        key, _, value = pair.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    n_boot = N_BOOT
    workdir = Path(tempfile.mkdtemp(prefix="bench_sources_"))
    if args.smoke:
        overrides.update(limit=400, epochs=1, size=32, presize=40, bs=16, pretrained=False, recipe="scratch",
                         arch="resnet18", cache_dir=str(workdir / "cache"))
        args.jsonl, args.csv, n_boot = str(workdir / "runs.jsonl"), str(workdir / "runs.csv"), 50
    jsonl = Path(args.jsonl)
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    done = {r["run"] for r in read_records(jsonl)}
    runs = [(STANDARD, "all", seed) for seed in args.seeds] if args.seeds else \
        [(kind, source, args.seed) for source in args.sources.split(",") for kind in args.runs.split(",")]
    for kind, source, seed in runs:
        name = f"{kind}:{source}:seed{seed}"
        if name in done:
            print(f"{name}: recorded in {jsonl}, not trained again")
            continue
        print(f"== {name}", flush=True)
        record = train_run(name, run_config(kind, source, args.data, {**overrides, "seed": seed}, workdir))
        with open(jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    table = write_csv(read_records(jsonl), Path(args.csv), target, n_boot)
    print_table(table)
    print(f"wrote {args.csv} from {jsonl}")


if __name__ == "__main__":
    main()
