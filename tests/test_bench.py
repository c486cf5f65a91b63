"""The benchmark scripts keep working (smoke mode); they assert nothing about speed."""

from __future__ import annotations

import getpass
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow  # each smoke trains or predicts in a fresh interpreter


def smoke(script: str, *args: str, tmpdir=None) -> str:
    """Run a benchmark script's --smoke mode; return its stdout after checking that it exited 0."""
    env = None
    if tmpdir is not None:
        # torch keeps its compile cache under the temporary folder unless told where; tell it this process's place,
        # as torch itself does once imported here, so that `tmpdir` holds only what the script made, in any order
        inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or str(
            Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}")
        env = {**os.environ, "TMPDIR": str(tmpdir), "TORCHINDUCTOR_CACHE_DIR": inductor}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke", *args],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_predict_benchmark_smoke_prints_its_figures(ham_dir, tmp_path):
    stdout = smoke("bench_predict.py", tmpdir=tmp_path)
    for figure in ("load (safetensors, default)", "inference copy", "single-image latency", "learn.get_preds, bs 64",
                   "predict_batch, bs 64", "ratio batch / loop", "TTA (learn.tta), 8 images",
                   "through the inference copy", "Grad-CAM map, one photo", "explain: predict + Grad-CAM"):
        assert figure in stdout
    assert "at 32 px" in stdout
    assert not list(tmp_path.rglob("*.pkl"))  # the throwaway model went with its temporary folder


def test_training_benchmark_smoke_runs_both_recipes_and_prints_the_ratio(ham_dir, tmp_path):
    import csv
    import json

    import numpy as np

    out = tmp_path / "runs.jsonl"
    # a variant and second trainings of both (another seed: the bench checks the split is one)
    variant = "ours+size=48+wd=0.1"
    runs = ["seed", "ours", variant, "ours+seed=7", f"{variant}+seed=8"]
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    table = tmp_path / "runs.csv"
    stdout = smoke("bench_train.py", "--size", "40", "--runs", ",".join(runs), "--out", str(out), "--csv", str(table),
                   tmpdir=tmp)
    assert not any(tmp.iterdir())  # the split, the cold presize cache and the runs' checkpoints are removed

    written = list(csv.DictReader(open(table)))  # a row a run, one value a cell, as the JSON lines hold them
    assert [r["name"] for r in written] == runs
    assert [r["setting_size"] for r in written] == ["40", "40", "48", "40", "48"]
    assert "ratio ours / seed, images/s end to end" in stdout
    assert f"ratio {variant} / ours, images/s end to end" in stdout and "steady" in stdout
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    rows, recipes = lines[:-1], lines[-1]
    assert [r["name"] for r in rows] == runs and recipes["name"] == "recipes"
    assert [r["settings"]["size"] for r in rows] == [40, 40, 48, 40, 48]  # --size is all runs', unless a run says
    assert [r["settings"]["wd"] for r in rows[1:]] == [None, 0.1, None, 0.1]
    assert [r["settings"]["seed"] for r in rows[1:]] == [42, 42, 7, 8]
    for r, w in zip(rows, written):
        assert float(w["valid_auroc"]) == pytest.approx(r["valid_auroc"], abs=1e-4)
    for r in rows:
        assert r["images_per_s"] > 0 and r["epochs"] == 1 and 0 <= r["valid_auroc"] <= 1
        assert 0 < r["valid_share"] < 1  # validation is timed as part of each epoch
    assert rows[1]["settings"]["cache"] is True
    # the variant against ours on the same valid images: the difference of the two AUROCs, with its interval
    for split in ("valid", "test"):
        paired = rows[2]["vs_first_ours"][split]["auroc"]
        assert paired["difference"] == pytest.approx(rows[2][f"{split}_auroc"] - rows[1][f"{split}_auroc"], abs=1e-9)
        assert -1 <= paired["ci95"][0] <= paired["ci95"][1] <= 1 and 0 < paired["p_value"] <= 1
        assert f"{split} auroc {variant} - ours:" in stdout
    assert "vs_first_ours" not in rows[1]

    # each recipe as the mean of its two trainings, judged against the noise between trainings of one recipe
    from sklearn.metrics import roc_auc_score

    from skincancer.data import prepare

    df = prepare(ham_dir, "binary", seed=rows[1]["split"]["seed"], limit=rows[1]["split"]["limit"])
    assert recipes["trainings"] == {"ours": 2, variant: 2} and recipes["first"] == "ours"
    ours, other = [rows[1], rows[3]], [rows[2], rows[4]]
    for split in ("valid", "test"):
        auroc = recipes["vs_first"][variant][f"{split}_auroc"]
        means = [np.mean([r[f"{split}_auroc"] for r in runs]) for runs in (other, ours)]
        assert auroc["difference"] == pytest.approx(means[0] - means[1], abs=1e-9)
        diffs = [other[0][f"{split}_auroc"] - other[1][f"{split}_auroc"],
                 ours[0][f"{split}_auroc"] - ours[1][f"{split}_auroc"]]
        noise = recipes["noise"][f"{split}_auroc"]
        assert noise["df"] == 2 and noise["sd"] == pytest.approx(np.sqrt(np.mean(np.square(diffs)) / 2), abs=1e-9)
        lo, hi = auroc["ci_with_training_noise"]
        assert lo <= auroc["ci_images"][0] and auroc["ci_images"][1] <= hi  # the noise only widens it
        # each recipe's two trainings averaged (an ensemble), against their mean, computed here again
        part = df[df["split"] == split]
        for recipe, runs, mean in (("ours", ours, means[1]), (variant, other, means[0])):
            averaged = recipes["averaged"][recipe][f"{split}_auroc"]
            average = np.mean([r["predictions"][split] for r in runs], axis=0)
            assert averaged["average"] == pytest.approx(roc_auc_score(part["label"] == "malignant", average), abs=1e-6)
            assert averaged["difference"] == pytest.approx(averaged["average"] - mean, abs=1e-9)
    assert f"auroc {variant}, its 2 trainings' probabilities averaged: " in stdout
    assert f"valid auroc {variant} - ours:" in stdout.split("recipes, each the mean")[1]

    # the same comparison from the runs' lines, as when they were trained in several processes: ours in one file,
    # the variant in another, and a line of ours again (the same seed: not a third training)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in (rows[0], rows[1], rows[3])))
    second.write_text("".join(json.dumps(r) + "\n" for r in (rows[2], rows[4], rows[1])))
    again = recipes_cli("--data", str(ham_dir), "--recipes", str(first), str(second))
    assert again["trainings"] == recipes["trainings"]
    for split_key, entry in recipes["vs_first"][variant].items():
        for k, v in entry.items():  # the probabilities were kept to 1e-6
            assert again["vs_first"][variant][split_key][k] == pytest.approx(v, abs=1e-5)
    stale = dict(rows[2], split={**rows[2]["split"], "sha256": "0" * 64})
    second.write_text(json.dumps(stale) + "\n")
    with pytest.raises(SystemExit, match="2 different splits"):
        recipes_cli("--data", str(ham_dir), "--recipes", str(first), str(second))
    # runs that say they were split with another seed than the one that drew their split
    first.write_text("".join(json.dumps(dict(r, split={**r["split"], "seed": 43})) + "\n" for r in rows[1:]))
    with pytest.raises(SystemExit, match="gives another split than the one these runs were trained on"):
        recipes_cli("--data", str(ham_dir), "--recipes", str(first))


def _bench_module(name: str):
    """A benchmark script imported in this process (its folder on the path for `common` and its siblings)."""
    import importlib.util

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


def recipes_cli(*args: str) -> dict:
    """bench_train.py --recipes in this process: the summary it printed as JSON."""
    import contextlib
    import io
    import json

    bench = _bench_module("bench_train")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert bench.main(list(args)) == 0
    return json.loads(stdout.getvalue().splitlines()[-1])["recipes"]


def test_augmentation_benchmark_smoke_times_both_pipelines(ham_dir, tmp_path):
    stdout = smoke("bench_augment.py", tmpdir=tmp_path)
    assert not any(tmp_path.iterdir())  # its presize cache is removed
    for figure in ("fastai ", "ours ", "ms/batch", "ratio ours / fastai's transforms, images/s"):
        assert figure in stdout


def test_views_benchmark_smoke_pairs_every_choice_with_the_models_own_evaluation(ham_dir, tmp_path):
    import csv

    stdout = smoke("bench_views.py", "--csv", str(tmp_path / "views.csv"), tmpdir=tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "views.csv")))
    assert sum(r["at_test_time"] == "32 px (plain)" for r in rows) == 1 and len(rows) == 5
    for r in rows:  # one number a cell: each parses as a float, or is empty where the plain row has no difference
        assert all(v == "" or float(v) == float(v) for k, v in r.items() if k != "at_test_time")
    for split in ("valid", "test"):
        block = stdout.split(f"\n{split} (")[1].split("\n\n")[0]
        recorded = float(re.search(r"AUROC in the model card: ([\d.]+)", block).group(1))
        baseline = float(re.search(r"32 px +([\d.]+) +the baseline", block).group(1))
        assert baseline == pytest.approx(recorded, abs=1e-4)  # the bench's pipeline is the one training scored
        for choice in ("24 px ", "32 px, flips and quarter turns", "32 px, fastai's tta", "40 px "):
            assert re.search(re.escape(choice) + r".* [01]\.\d{4} +[+-]\d\.\d{4} \(", block), choice
    assert not list(tmp_path.rglob("*.pkl"))  # the throwaway model went with its temporary folder


def test_ensemble_benchmark_smoke_reproduces_each_card_and_pairs_the_average(ham_dir, tmp_path):
    import json

    import csv

    out = tmp_path / "ensemble.json"
    stdout = smoke("bench_ensemble.py", "--out", str(out), "--csv", str(tmp_path / "ensemble.csv"), tmpdir=tmp_path)
    result = json.loads(out.read_text())
    rows = list(csv.DictReader(open(tmp_path / "ensemble.csv")))
    assert [r["row"] for r in rows[:5]][2:] == ["average of 2", "average - models' mean", rows[4]["row"]]
    mean = rows[3]  # the CSV holds the JSON's figures, one number a cell
    d = result["splits"]["valid"]["paired"]["models' mean"]["auroc"]
    assert float(mean["auroc"]) == pytest.approx(d["difference"], abs=1e-4)
    assert float(mean["auroc_ci_low"]) <= float(mean["auroc"]) <= float(mean["auroc_ci_high"])
    assert "average of 2" in stdout and "- models' mean" in stdout
    for split in ("valid", "test"):
        r = result["splits"][split]
        models, average = r["rows"][:2], r["rows"][2]
        for card, row in zip(result["cards"], models):  # the bench predicts as training scored each model
            for k in ("auroc", "sensitivity", "specificity"):
                assert row[k] == pytest.approx(card["metrics"][split][k], abs=1e-4), (split, k)
        mean = r["paired"]["models' mean"]
        for k in ("auroc", "balanced_accuracy"):
            assert mean[k]["difference"] == pytest.approx(average[k] - (models[0][k] + models[1][k]) / 2, abs=1e-9)
        for card, row in zip(result["cards"], models):
            name = card["config"]["out"].rsplit("/", 1)[1]
            assert r["paired"][name]["auroc"]["difference"] == pytest.approx(average["auroc"] - row["auroc"], abs=1e-9)
    assert result["splits"]["valid"]["rows"][2]["sensitivity"] >= 0.9  # its threshold was chosen on valid for 90%
    assert not list(tmp_path.rglob("*.pkl"))  # the throwaway models went with their temporary folder


def test_sources_benchmark_smoke_writes_each_runs_rows_from_its_records(ham_dir, tmp_path):
    import csv
    import json

    stdout = smoke("bench_sources.py", "--sources", "rosendahl", tmpdir=tmp_path)
    written = re.search(r"wrote (\S+\.csv) from (\S+\.jsonl)", stdout)
    rows = list(csv.DictReader(open(written.group(1))))
    assert [(r["split"], r["rule"]) for r in rows] == [("heldout", "plain"), ("heldout", "confident"),
                                                      ("random", "plain"), ("random", "confident")]
    records = [json.loads(line) for line in open(written.group(2))]
    assert [r["run"] for r in records] == ["heldout:rosendahl:seed42", "random:rosendahl:seed42"]
    held, rand = records
    assert int(rows[0]["test_images"]) == len(held["test"]["truth"])
    assert rows[0]["test_lesions"] == rows[1]["test_lesions"]
    # the random split's test holds as many lesions as the held-out source's, give or take the stratification
    assert abs(len(set(rand["test"]["lesion"])) - len(set(held["test"]["lesion"]))) <= 3
    for r in rows:
        assert float(r["test_auroc_lo"]) <= float(r["test_auroc"]) <= float(r["test_auroc_hi"])
    assert float(rows[1]["threshold"]) <= float(rows[0]["threshold"])  # the margin lowers the threshold


def test_check_benchmark_smoke_scores_every_candidate_on_every_set(ham_dir, originals_dir, tmp_path):
    import csv

    stdout = smoke("bench_check.py", "--data", str(ham_dir), "--originals", str(originals_dir / "images"),
                   tmpdir=tmp_path)
    written = re.search(r"wrote (\S+\.csv)", stdout).group(1)
    rows = list(csv.DictReader(open(written)))
    assert len(rows) == 9 and sum(r["shipped"] == "True" for r in rows) == 1
    for r in rows:
        assert float(r["valid_pass"]) >= 0.97  # each threshold lets 99% of valid through, on a tiny valid split
        assert 0 <= float(r["measure_refused"]) <= 1 and int(r["measure_photos"]) > 50
        assert 0 <= float(r["originals_pass"]) <= 1 and int(r["test_photos"]) > 0
    flat = [r for r in rows if r["score"] == "softmax confidence"][0]
    # drawn flat colours never reach the network (open_photo refuses them): refused whatever the score
    assert float(flat["measure_refused"]) >= 6 / int(flat["measure_photos"])


def test_serving_benchmark_smoke_writes_one_row_a_model_file(ham_dir, tmp_path):
    import csv

    smoke("bench_serve.py", "--csv", str(tmp_path / "serve.csv"), tmpdir=tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "serve.csv")))
    assert [r["file"] for r in rows] == ["pkl", "onnx fp32", "onnx int8"] and rows[0]["vs_pkl"] == "1.0"
    for r in rows:
        assert float(r["images_per_s"]) > 0 and float(r["file_mb"]) > 0
        assert float(r["vs_pkl"]) == pytest.approx(float(r["images_per_s"]) / float(rows[0]["images_per_s"]), abs=0.01)


def test_shades_of_gray_divides_out_a_colour_cast_and_copies_a_set_once(originals_dir, tmp_path):
    import numpy as np
    from PIL import Image

    from skincancer.data import read_metadata

    bench = _bench_module("bench_constancy")
    rng = np.random.default_rng(0)
    scene = rng.integers(40, 200, (30, 40, 1)).repeat(3, axis=2).astype(np.float64)
    cast = (scene * [1.0, 0.7, 0.5]).astype(np.uint8)  # a warm lamp
    fixed = bench.shades_of_gray(cast).astype(np.float64)
    norms = np.power(np.mean(np.power(fixed, bench.NORM), axis=(0, 1)), 1 / bench.NORM)
    assert norms.max() / norms.min() < 1.02 < (cast.astype(float)[..., 0].mean() / cast[..., 2].mean())
    grey = scene.astype(np.uint8)
    assert np.abs(bench.shades_of_gray(grey).astype(int) - grey).max() <= 1  # white light: nothing to divide out

    out = bench.constancy_copy(str(originals_dir), tmp_path / "copy")
    before, after = read_metadata(originals_dir), read_metadata(out)
    assert after[["image_id", "lesion_id", "dx"]].equals(before[["image_id", "lesion_id", "dx"]])
    first = Path(after["path"].iloc[0])
    assert first.suffix == ".png" and Image.open(first).size == Image.open(before["path"].iloc[0]).size
    stamp = first.stat().st_mtime_ns
    assert bench.constancy_copy(str(originals_dir), out) == out and first.stat().st_mtime_ns == stamp  # written once
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # no temporary folder left


def test_constancy_comparison_pairs_the_arms_on_one_split():
    import numpy as np

    bench = _bench_module("bench_constancy")
    rng = np.random.default_rng(1)
    lesions = [f"L{i // 2}" for i in range(400)]
    truth = [int(i // 2 % 5 == 0) for i in range(400)]

    def record(arm: str, skill: float) -> dict:
        def split() -> dict:
            p = 1 / (1 + np.exp(-(skill * (np.array(truth) - 0.5) + rng.normal(0, 1, 400))))
            return {"truth": truth, "p": p.tolist(), "lesion": lesions}
        return {"run": f"{arm}:heldout:rosendahl:seed42", "seed": 42, "train_minutes": 1.0,
                "valid": split(), "test": split()}

    plain, constancy = record("plain", 1.0), record("constancy", 3.0)
    rows = bench.compare(plain, constancy, 0.9, n_boot=200)
    assert [r["rule"] for r in rows] == ["plain", "confident"] and rows[0]["source"] == "rosendahl"
    for r in rows:
        assert abs(r["auroc_difference"] - (r["constancy_auroc"] - r["plain_auroc"])) < 1e-3
        assert r["auroc_difference_lo"] <= r["auroc_difference"] <= r["auroc_difference_hi"]
    assert rows[0]["auroc_difference_lo"] > 0  # the sharper arm is better beyond its interval
    # the CSV pairs every source recorded in both arms, and leaves out one trained in a single arm
    other = {r["run"].replace("rosendahl", "vidir_modern"): {**r, "run": r["run"].replace("rosendahl", "vidir_modern")}
             for r in (plain, constancy)}
    lone = {**plain, "run": "plain:heldout:vienna_dias:seed42"}
    recorded = {r["run"]: r for r in (plain, constancy, *other.values(), lone)}
    paired = bench.paired_rows(recorded, 0.9, n_boot=50)
    assert [(r["source"], r["rule"]) for r in paired] == [(s, rule) for s in ("rosendahl", "vidir_modern")
                                                          for rule in ("plain", "confident")]
    constancy["test"] = {**constancy["test"], "lesion": lesions[::-1]}
    with pytest.raises(SystemExit, match="different photos"):
        bench.compare(plain, constancy, 0.9, n_boot=200)


def test_sources_report_gives_the_standard_recipes_spread_across_seeds(tmp_path, capsys):
    import csv
    import json

    import numpy as np

    bench = _bench_module("bench_sources")
    rng = np.random.default_rng(2)
    truth = [int(i % 4 == 0) for i in range(200)]
    lesions = [f"L{i}" for i in range(200)]

    def split(noise: float) -> dict:
        p = 1 / (1 + np.exp(-(2 * (np.array(truth) - 0.5) + rng.normal(0, noise, 200))))
        return {"truth": truth, "p": p.tolist(), "lesion": lesions}

    runs = tmp_path / "runs.jsonl"
    seeds = ((42, 0.8), (1, 1.0), (2, 1.4))  # each training its own test noise: three different figures
    runs.write_text("".join(json.dumps({"run": f"standard:all:seed{seed}", "recipe": "cpu", "seed": seed,
                                        "train_minutes": 28.0, "train_images": 7000, "valid": split(1.0),
                                        "test": split(noise)}) + "\n" for seed, noise in seeds))
    bench.main(["--report", str(runs), "--csv", str(tmp_path / "runs.csv")])
    rows = list(csv.DictReader(open(tmp_path / "runs.csv")))
    plain = [float(r["test_auroc"]) for r in rows if r["rule"] == "plain"]
    assert len(plain) == 3 and len(set(plain)) == 3
    printed = capsys.readouterr().out
    expected = f"test auroc {np.mean(plain):.3f} ± {np.std(plain, ddof=1):.3f}"
    assert f"standard recipe over 3 seeds, plain threshold (mean ± SD): {expected}" in printed
    sens = [float(r["sensitivity"]) for r in rows if r["rule"] == "confident"]
    assert f"sensitivity {np.mean(sens):.3f} ± {np.std(sens, ddof=1):.3f}" in printed.split("confident threshold")[1]
