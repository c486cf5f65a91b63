"""Loading an export, safely and against its card, and the predict command."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from skincancer import SkinCancerError, cli
from skincancer.rebuild import save_weights
from skincancer.predict import load
from skincancer.files import model_files, sha256_file


class _Payload:
    """Unpickling this creates a file: the stand-in for arbitrary code in a hostile .pkl."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted_pickle(path, marker):
    path.write_bytes(pickle.dumps(_Payload(marker)))


def test_load_is_cached_per_path(trained, clf):
    assert load(trained) is clf
    assert clf.classes == ["benign", "malignant"]
    assert clf.threshold == json.loads(trained.with_suffix(".json").read_text())["threshold"]


def _card(path, **fields):
    """Write a model card for `path` with `fields` (the keys loading needs, and whatever else is given)."""
    card = {"task": "binary", "classes": ["benign", "malignant"], "arch": "resnet50", "size": 64, "presize": 96}
    path.with_suffix(".json").write_text(json.dumps({**card, **fields}))


def test_a_crafted_pickle_is_refused_and_never_run_unless_its_card_vouches_for_it(tmp_path):
    model, marker = tmp_path / "evil.pkl", tmp_path / "pwned"
    _crafted_pickle(model, marker)
    for trusted in (False, True):
        with pytest.raises(SkinCancerError, match="evil.json: no model card beside evil.pkl"):
            load(model, trusted=trusted)
    _card(model, sha256="0" * 64)
    with pytest.raises(SkinCancerError, match="evil.pkl: its sha256 does not match the model card evil.json"):
        load(model)
    assert not marker.exists()
    _card(model, sha256=sha256_file(model))  # a card that vouches for it: unpickled, and the payload runs
    with pytest.raises(SkinCancerError, match="not a loadable fastai learner"):
        load(model)
    assert marker.exists()  # which proves the payload was real


def test_a_crafted_pickle_beside_real_weights_is_never_read(export_copy, tmp_path, original_images):
    marker = tmp_path / "pwned"
    _crafted_pickle(export_copy, marker)
    with pytest.raises(SkinCancerError, match="model.pkl: its sha256 does not match the model card model.json"):
        load(export_copy)  # the file named is checked, then the weights beside it would have been read
    clf = load(export_copy.with_suffix(".safetensors"))  # the weights alone: no pickle is read
    assert not marker.exists()
    assert 0 <= clf.predict(original_images[0])["malignant_probability"] <= 1


def test_the_genuine_pickle_loads_when_its_hash_matches_the_card(export_copy, original_images):
    export_copy.with_suffix(".safetensors").unlink()
    assert load(export_copy).predict(original_images[0])["label"] in ("benign", "malignant")


def test_tampered_weights_are_refused(export_copy):
    weights = export_copy.with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SkinCancerError, match="model.safetensors: its sha256 does not match the model card"):
        load(export_copy)


@pytest.mark.parametrize("replaced", [".pkl", ".safetensors"])
def test_another_models_file_in_an_export_is_refused_naming_it(export_copy, tmp_path, replaced):
    other = load(export_copy, trusted=True).learn  # another model: the same network with other weights
    with torch.no_grad():
        next(other.model.parameters()).mul_(1.5)
    if replaced == ".pkl":
        other.export(export_copy.resolve())
    else:
        save_weights(other.model, export_copy.with_suffix(".safetensors"))
    # the safe load reads both files; an unpickling (trusted) one reads the .pkl alone
    for trusted in (False, True) if replaced == ".pkl" else (False,):
        with pytest.raises(SkinCancerError, match=rf"model{replaced}: its sha256 does not match the model card"):
            load(export_copy, trusted=trusted)


def test_every_file_of_an_export_is_readable_by_others(trained):
    # a service account other than the trainer's must read all of them: as any file the user creates
    mask = os.umask(0)
    os.umask(mask)
    for path in model_files(trained).values():
        if path.exists():
            assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


def test_safe_weights_predict_what_the_pickle_predicts(trained, original_images):
    safe, pickled = load(trained), load(trained, trusted=True)
    assert safe is not pickled
    a = np.array([list(r["probabilities"].values()) for r in safe.predict_batch(original_images)])
    b = np.array([list(r["probabilities"].values()) for r in pickled.predict_batch(original_images)])
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_file_that_is_not_a_model_is_refused(tmp_path):
    fake = tmp_path / "fake.pkl"
    fake.write_bytes(b"\x80\x04not really")
    _card(fake, sha256=sha256_file(fake))
    with pytest.raises(SkinCancerError, match="fake.pkl: not a loadable fastai learner"):
        load(fake, trusted=True)
    with pytest.raises(SkinCancerError, match="fake.json: not a model file"):
        load(fake.with_suffix(".json"))


# --- the predict command ---------------------------------------------------------------------------


def test_cli_predict_prints_json_lines_and_fails_on_a_bad_image(trained, original_images, tmp_path, capsys):
    assert cli.main(["predict", "--model", str(trained), *map(str, original_images[:2])]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["image"] for x in lines] == [str(p) for p in original_images[:2]]
    card = json.loads(trained.with_suffix(".json").read_text())
    assert all(set(x) == {"image", "label", "call", "malignant_probability", "threshold", "target_sensitivity",
                          "probabilities", "dermoscopy", "check_score", "check_threshold"} for x in lines)
    assert all(x["dermoscopy"] is True and x["check_score"] <= x["check_threshold"] for x in lines)
    # each line says where the call was made: the threshold, and the validation sensitivity it was chosen for
    assert all((x["threshold"], x["target_sensitivity"]) == (card["threshold"], 0.9) for x in lines)
    assert all(x["call"] == x["label"] for x in lines)  # binary: the label is the call at the threshold
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    assert cli.main(["predict", "--model", str(trained), str(bad), str(original_images[0])]) == 1
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert set(lines[0]) == {"image", "error"} and "label" in lines[1]


def test_cli_predict_writes_each_chunk_as_it_comes_and_progress_only_to_a_terminal(trained, original_images,
                                                                                   monkeypatch, capsys):
    import sys

    from skincancer.classifier import Classifier

    written, real = [], Classifier.predict_chunks

    def chunks(self, *args, **kwargs):
        for results in real(self, *args, **kwargs):
            written.append(capsys.readouterr())  # what was written before this chunk was handed on
            yield results

    monkeypatch.setattr(Classifier, "predict_chunks", chunks)
    monkeypatch.setattr(cli, "PREDICT_CHUNK", 2)
    images = [str(p) for p in original_images[:5]]
    assert cli.main(["predict", "--model", str(trained), *images]) == 0
    written.append(capsys.readouterr())
    # each chunk's two lines were written before the next chunk was ready; nothing on stderr, not a terminal
    assert [len(w.out.splitlines()) for w in written[1:]] == [2, 2, 1] and not any(w.err for w in written)
    assert [json.loads(x)["image"] for w in written for x in w.out.splitlines()] == images
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    written.clear()
    assert cli.main(["predict", "--model", str(trained), *images]) == 0
    err = "".join(w.err for w in written) + capsys.readouterr().err
    assert "predicted 2 of 5 images" in err and "predicted 5 of 5 images" in err


def test_cli_predict_as_csv_has_the_json_lines_figures_a_column_per_class(trained, original_images, tmp_path,
                                                                          capsys):
    bad = tmp_path / "bad, name.jpg"  # a comma: the CSV quotes it
    bad.write_bytes(b"\xff\xd8\xff garbage")
    images = [str(original_images[0]), str(bad), str(original_images[1])]
    assert cli.main(["predict", "--model", str(trained), *images]) == 1
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert cli.main(["predict", "--model", str(trained), "--format", "csv", *images]) == 1
    table = pd.read_csv(io.StringIO(capsys.readouterr().out), keep_default_na=False)
    assert list(table.columns) == ["image", "call", "label", "malignant_probability", "threshold", "target_sensitivity",
                                   "probability_benign", "probability_malignant", "dermoscopy", "check_score",
                                   "check_threshold", "reason", "error"]
    assert list(table["image"]) == images
    for (_, row), line in zip(table.iterrows(), lines):
        if "error" in line:
            assert row["error"] == line["error"] and row["call"] == "" and row["malignant_probability"] == ""
            continue
        assert row["call"] == line["call"] and row["error"] == "" and float(row["threshold"]) == line["threshold"]
        assert float(row["malignant_probability"]) == pytest.approx(line["malignant_probability"], abs=1e-12)
        for c, p in line["probabilities"].items():
            assert float(row[f"probability_{c}"]) == pytest.approx(p, abs=1e-12)
    photos = [str(p) for p in original_images[:2]]
    assert cli.main(["predict", "--model", str(trained), "--format", "csv", "--lesion", *photos]) == 0
    lesion = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert len(lesion) == 1 and lesion["image"][0] == ";".join(photos)
    assert lesion["malignant_probability"][0] == pytest.approx(
        np.mean([x["malignant_probability"] for x in lines if x["image"] in photos]), abs=1e-9)


def test_cli_predict_into_a_closed_pipe_stops_quietly(trained, original_images):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.Popen([sys.executable, "-m", "skincancer", "predict", "--model", str(trained),
                             str(original_images[0].parent)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc.stdout.close()  # as `| head -1` does once it has its line: every write after this fails
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err, err[-2000:]


def test_cli_predict_reads_the_images_under_a_folder(trained, original_images, tmp_path, capsys):

    folder, empty = tmp_path / "photos", tmp_path / "empty"
    (folder / "inner").mkdir(parents=True)
    empty.mkdir()
    copies = [folder / "b.jpg", folder / "inner" / "a.jpg", folder / "c.png"]
    for src, dest in zip(original_images, copies):
        shutil.copy(src, dest) if dest.suffix == ".jpg" else Image.open(src).save(dest)
    (folder / "notes.txt").write_text("not an image")
    assert cli.main(["predict", "--model", str(trained), str(folder), str(empty), str(original_images[3])]) == 1
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["image"] for x in lines] == [*sorted(map(str, copies)), str(empty), str(original_images[3])]
    assert [("error" in x) for x in lines] == [False, False, False, True, False]
    assert lines[3]["error"].startswith(f"{empty}: a folder with no images in it (looked for .bmp, .jpeg, .jpg")


def test_cli_predict_with_a_missing_model_is_an_error_line(tmp_path, original_images):
    run = subprocess.run([sys.executable, "-m", "skincancer", "predict", "--model", str(tmp_path / "none.pkl"),
                          str(original_images[0])], capture_output=True, text=True)
    assert run.returncode == 2
    assert "none.pkl: no such model file" in run.stderr and "Traceback" not in run.stderr


def test_cli_predicts_one_lesion_from_its_photos(trained, original_images, capsys):
    assert cli.main(["predict", "--model", str(trained), "--lesion", *map(str, original_images[:2])]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    result = json.loads(line)
    assert result["lesion"] == [str(p) for p in original_images[:2]] and len(result["photos"]) == 2
    assert set(result) == {"lesion", "label", "call", "malignant_probability", "threshold", "target_sensitivity",
                           "probabilities", "dermoscopy", "photos"}


def test_a_photo_too_small_or_flat_gets_no_call_in_a_batch_or_a_lesion(trained, original_images, tmp_path):
    tiny, flat = tmp_path / "tiny.jpg", tmp_path / "white.png"
    Image.new("RGB", (1, 1), (90, 60, 40)).save(tiny)
    Image.new("RGB", (600, 450), "white").save(flat)
    clf = load(trained)
    results = clf.predict_batch([tiny, original_images[0], flat])
    assert "too small to judge" in results[0]["error"] and "call" not in results[0]
    assert results[1]["call"] in ("benign", "malignant")
    assert "single flat colour" in results[2]["error"] and "call" not in results[2]
    with pytest.raises(SkinCancerError, match=r"tiny.jpg: 1x1 pixels is too small to judge"):
        clf.predict_lesion([original_images[0], tiny])
