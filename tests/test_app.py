"""The web app, served on a free port with a model trained in the tests: gradio_client, then headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT
import numpy as np
from PIL import Image

from skincancer.app import analyse, analyse_lesion, markdown_text, side_by_side, verdict
from skincancer.card import ModelCard
from skincancer.cli import build_parser
from skincancer import DISCLAIMER
from skincancer.predict import load
from skincancer.predictor import Predictor

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# as the machine's probe runs it: no sandbox as root, and none of the background calls a closed network refuses
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(trained, tmp_path_factory):
    """The app of the `trained` model, started by the CLI on a free port with a 1 MB upload limit."""
    work = tmp_path_factory.mktemp("app")
    port = _free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(work / "gradio"), "PYTHONPATH": str(ROOT)}
    log = open(work / "app.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "skincancer", "app", "--model", str(trained), "--port", str(port),
                             "--max-upload-mb", "1"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.seek(0)
            pytest.fail(f"the app did not start:\n{log.read()[-3000:]}")
        time.sleep(1)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def client(app_url):
    """A gradio_client for the app."""
    from gradio_client import Client

    return Client(app_url, verbose=False)


def _predict(client, path):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), api_name="/predict_upload")


def test_an_upload_gets_one_call_in_the_verdict_the_label_and_the_data_and_gradcam(client, trained, original_images):
    image = original_images[0]
    text, call, data, overlay = _predict(client, image)
    expected = load(trained).predict(image)
    # one answer everywhere: the label shows the call the verdict gives, and the data carry it with its probability
    assert call["label"] == data["call"] == expected["call"]
    assert data["malignant_probability"] == pytest.approx(expected["malignant_probability"], abs=1e-6)
    assert data["threshold"] == pytest.approx(expected["threshold"]) and data["label"] == expected["label"]
    assert data["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
    assert f"**{expected['malignant_probability']:.2f}**" in text
    assert ("Malignant: worth a closer look" if expected["call"] == "malignant" else "Benign by this model") in text
    assert DISCLAIMER in text
    with Image.open(overlay) as im:  # the Grad-CAM overlay, at the photo's size
        assert im.size == Image.open(image).size


def test_every_output_of_the_api_is_named(client):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for endpoint in api.values():
        names = [r["label"] for r in endpoint["returns"]]
        assert names[:3] == ["verdict", "call", "result"], names
        assert not any(name.startswith("value_") for name in names)


def test_several_photos_of_a_lesion_get_one_call_on_the_mean_and_each_photo_its_row(client, trained,
                                                                                    original_images):
    from gradio_client import handle_file

    photos = original_images[4:7]
    text, call, data, overlay = client.predict([handle_file(str(p)) for p in photos], api_name="/predict_lesion")
    expected = load(trained).predict_lesion(photos)
    assert call["label"] == data["call"] == expected["call"]
    assert data["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-4)
    assert [p["call"] for p in data["photos"]] == [p["call"] for p in expected["photos"]]
    assert f"mean of the 3 photos of this lesion **{expected['malignant_probability']:.2f}**" in text
    for i, (photo, own) in enumerate(zip(photos, expected["photos"]), 1):
        assert f"| {i} | {markdown_text(photo.name)} | {own['malignant_probability']:.2f} | {own['call']} |" in text
    assert DISCLAIMER in text
    with Image.open(overlay) as im:  # the three Grad-CAMs in a row, each 300 px high
        sizes = [Image.open(p).size for p in photos]
        assert im.size == (sum(round(w * 300 / h) for w, h in sizes) + 8 * 2, 300)


def test_one_unusable_photo_of_a_lesion_stops_the_call_and_is_named(client, trained, tmp_path, original_images):
    from gradio_client import handle_file

    bad = tmp_path / "second.jpg"
    bad.write_bytes(original_images[1].read_bytes()[:3000])
    text, call, data, overlay = client.predict([handle_file(str(original_images[0])), handle_file(str(bad))],
                                               api_name="/predict_lesion")
    assert text.startswith("Could not use this upload: second.jpg") and str(tmp_path) not in text, text
    assert not call and data is None and overlay is None
    clf = load(trained)
    assert "Upload two or more photos" in analyse_lesion(clf, [])[0]
    text, call, data, _ = analyse_lesion(clf, [str(original_images[0])] * 3, max_photos=2)
    assert "3 photos is over this app's limit of 2" in text and call is None and data is None


def _card(classes: list[str], threshold: float) -> ModelCard:
    return ModelCard(task="binary" if len(classes) == 2 else "dx", classes=classes, arch="resnet18", size=64,
                     presize=96, threshold=threshold)


def test_a_file_name_is_shown_as_it_is_and_cannot_break_the_table():
    clf = Predictor(card=_card(["benign", "malignant"], 0.3), path=Path("m.pkl"))
    photos = [{"malignant_probability": 0.2, "call": "benign"}, {"malignant_probability": 0.6, "call": "malignant"}]
    result = {"label": "malignant", "call": "malignant", "malignant_probability": 0.4, "photos": photos}
    text = verdict(clf, result, ["left|right.jpg", "**<b>bold</b>**.png"])
    rows = [line for line in text.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert rows == ["| 1 | left\\|right.jpg | 0.20 | benign |",
                    "| 2 | \\*\\*\\<b\\>bold\\</b\\>\\*\\*.png | 0.60 | malignant |"]
    assert "mean of the 2 photos of this lesion **0.40**" in text


def test_side_by_side_scales_every_image_to_one_height_in_order():
    red, blue = Image.new("RGB", (40, 20), "red"), Image.new("RGB", (10, 10), "blue")
    row = side_by_side([red, blue], height=30, gap=5)
    assert row.size == (60 + 5 + 30, 30)
    assert row.getpixel((0, 0)) == (255, 0, 0) and row.getpixel((62, 15)) == (255, 255, 255)
    assert row.getpixel((65, 0)) == (0, 0, 255) and row.getpixel((94, 29)) == (0, 0, 255)


def test_a_corrupt_or_non_image_upload_gets_a_message_and_the_app_keeps_serving(client, tmp_path, original_images):
    garbage = tmp_path / "notes.jpg"
    garbage.write_bytes(b"these are not the pixels you are looking for" * 20)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(original_images[1].read_bytes()[:3000])
    for bad in (garbage, truncated):
        text, call, data, overlay = _predict(client, bad)
        assert text.startswith("Could not use this upload: ") and bad.name in text, text
        assert str(tmp_path) not in text and "gradio" not in text  # names the file, not a server path
        assert not call and data is None and overlay is None
    assert "Probability of malignancy" in _predict(client, original_images[1])[0]


def test_an_upload_over_the_limit_is_refused_and_the_app_keeps_serving(client, tmp_path, original_images):
    big = tmp_path / "big.png"
    Image.effect_noise((700, 700), 64).convert("RGB").save(big)  # noise does not compress: about 1.5 MB
    assert big.stat().st_size > 1_000_000
    with pytest.raises(Exception, match="(?i)size|large|413"):
        _predict(client, big)
    assert "Probability of malignancy" in _predict(client, original_images[2])[0]


def test_the_app_listens_on_loopback_unless_told_otherwise(app_url):
    assert build_parser().parse_args(["app", "--model", "m.pkl"]).host == "127.0.0.1"
    assert app_url.startswith("http://127.0.0.1:")


def test_a_port_in_use_is_one_clear_error(app_url, trained):
    port = app_url.rstrip("/").rsplit(":", 1)[1]
    run = subprocess.run([sys.executable, "-m", "skincancer", "app", "--model", str(trained), "--port", port],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 2 and f"--port {port}: cannot listen there" in run.stderr, run.stderr[-2000:]
    assert "Traceback" not in run.stderr


def test_the_page_takes_images_only_never_a_path_on_the_server(client, app_url, original_images):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(api) == {"/predict_upload", "/predict_camera", "/predict_lesion"}
    assert all(len(e["parameters"]) == 1 for e in api.values())
    # a request naming a file that exists on the server, instead of uploading it, is refused
    call = f"{app_url}gradio_api/call/predict_upload"
    body = json.dumps({"data": [{"path": str(original_images[0]), "meta": {"_type": "gradio.FileData"}}]}).encode()
    request = urllib.request.Request(call, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        event = json.load(r)["event_id"]
    with urllib.request.urlopen(f"{call}/{event}", timeout=60) as r:
        stream = r.read().decode()
    assert "event: error" in stream and "Probability" not in stream, stream


def test_the_verdict_of_a_seven_class_model_gives_the_call_at_the_threshold_and_names_the_diagnosis():
    clf = Predictor(card=_card(["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"], 0.3),
                    path=Path("dx.pkl"))
    # nv is the most likely diagnosis, but mel + bcc + akiec (0.35) pass the threshold: the call is malignant
    result = {"label": "nv", "call": "malignant", "malignant_probability": 0.35, "probabilities": {"nv": 0.6}}
    text = verdict(clf, result)
    assert text.startswith("### Malignant: worth a closer look")
    assert "(mel + bcc + akiec) **0.35** (operating threshold 0.30)" in text
    assert "Most likely diagnosis: **nv** (melanocytic nevus, probability 0.60)" in text and DISCLAIMER in text
    benign = verdict(clf, {**result, "call": "benign", "malignant_probability": 0.1})
    assert benign.startswith("### Benign by this model's threshold") and "**nv**" in benign
    # calibrated, the probability of malignancy says so, and the diagnosis keeps the network's score
    assert clf.scores_title == "class probabilities"
    clf.card.calibration = {"method": "platt", "slope": 0.5, "intercept": -1.0}
    calibrated = verdict(clf, result)
    assert "(mel + bcc + akiec, calibrated) **0.35**" in calibrated
    assert "(melanocytic nevus, network score 0.60)" in calibrated
    clf.card.calibration = {**clf.calibration, "n": 1442, "n_malignant": 286}
    assert "Calibrated on 1,442 validation photos of which 20% were malignant" in verdict(clf, result)
    assert clf.scores_title == "diagnosis scores (not calibrated)"


def test_analyse_turns_bad_input_into_messages(trained, tmp_path):
    clf = load(trained)
    assert "Upload a photo" in analyse(clf, None)[0]
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"x" * 2000)
    text, call, data, overlay = analyse(clf, str(photo), max_bytes=1000)
    assert "photo.jpg" in text and "over this app's limit" in text and call is None and overlay is None
    odd = tmp_path / "my_lesion_<1>.jpg"  # named as it is on the page, not as Markdown would render it
    odd.write_bytes(b"x" * 2000)
    assert analyse(clf, str(odd))[0].startswith("Could not use this upload: my\\_lesion\\_\\<1\\>.jpg: ")


@pytest.fixture(scope="module")
def chromium():
    """Debian's Chromium, headless, driven by Playwright; a fake camera stands in for a webcam."""
    if CHROMIUM is None:
        msg = "Debian's chromium is not installed (apt-get install chromium); .ci/run installs it"
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS + [
            "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"])
        try:
            yield browser
        finally:
            browser.close()


def _page(chromium, app_url):
    from playwright.sync_api import expect

    page = chromium.new_context(viewport={"width": 1280, "height": 1000}, permissions=["camera"]).new_page()
    page.goto(app_url)
    expect(page.get_by_text(DISCLAIMER).first).to_be_visible(timeout=60_000)
    return page


def _expect_result(page):
    from playwright.sync_api import expect

    expect(page.locator("#verdict")).to_contain_text("Probability of malignancy", timeout=120_000)
    expect(page.locator("#verdict")).to_contain_text(DISCLAIMER)
    expect(page.locator("#gradcam img")).to_be_visible(timeout=30_000)
    expect(page.locator("#call")).to_contain_text("malignant" if "Malignant:" in page.locator("#verdict").inner_text()
                                                  else "benign")


def test_an_upload_in_chromium_shows_the_result_and_a_screenshot_is_saved(chromium, app_url, original_images,
                                                                        tmp_path):
    page = _page(chromium, app_url)
    page.locator("#upload input[type=file]").set_input_files(str(original_images[3]))
    _expect_result(page)
    shot = Path(os.environ.get("SKINCANCER_SCREENSHOT_DIR", tmp_path)) / "app.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size[0] >= 1280


def test_a_corrupt_upload_in_chromium_shows_a_message(chromium, app_url, tmp_path):
    from playwright.sync_api import expect

    bad = tmp_path / "lesion.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG" * 50)
    page = _page(chromium, app_url)
    page.locator("#upload input[type=file]").set_input_files(str(bad))
    expect(page.locator("#verdict")).to_contain_text("Could not use this upload: lesion.jpg", timeout=60_000)


def test_several_photos_of_a_lesion_in_chromium_are_called_together(chromium, app_url, original_images):
    from playwright.sync_api import expect

    page = _page(chromium, app_url)
    page.get_by_role("tab", name="Several photos of one lesion").click()
    page.locator("#lesion input[type=file]").set_input_files([str(p) for p in original_images[7:9]])
    _expect_result(page)
    expect(page.locator("#verdict")).to_contain_text("mean of the 2 photos of this lesion")
    expect(page.locator("#verdict table")).to_contain_text(original_images[8].name)


def _expect_refusal(page):
    from playwright.sync_api import expect

    expect(page.locator("#verdict")).to_contain_text("Not judged: not a dermoscopy photo", timeout=120_000)
    expect(page.locator("#verdict")).to_contain_text("check score")  # the photo went through the network
    expect(page.locator("#verdict")).to_contain_text(DISCLAIMER)
    expect(page.locator("#verdict")).not_to_contain_text("Probability of malignancy")


def test_a_camera_snapshot_in_chromium_reaches_the_model_and_a_test_pattern_gets_no_call(chromium, app_url):
    page = _page(chromium, app_url)
    page.get_by_role("tab", name="Camera").click()
    page.locator("#camera button").filter(has_text="Webcam").click()  # Chromium's fake camera: a test pattern
    # capture only once the stream plays: a snapshot taken before is empty
    page.wait_for_function("document.querySelector('#camera video')?.readyState >= 2", timeout=60_000)
    page.locator("#camera button[aria-label='capture photo']").click(timeout=60_000)
    _expect_refusal(page)  # a test pattern is no dermoscopy photo: checked, and no call


def test_a_portrait_upload_in_chromium_is_not_judged(chromium, app_url):
    page = _page(chromium, app_url)
    portrait = Path(np.__file__).resolve().parents[1] / "matplotlib" / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    page.locator("#upload input[type=file]").set_input_files(str(portrait))
    _expect_refusal(page)
