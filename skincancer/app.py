"""A local web app for an exported model (Gradio): upload or camera in; the verdict, the call, the result as data
and Grad-CAM out.

A third tab takes several photos of one lesion and calls it on the mean of their probabilities, as
`Predictor.predict_lesion` and `evaluate`'s lesion-by-lesion figures do.

`python -m skincancer app --model models/skincancer.pkl` serves it on http://127.0.0.1:7860. The model is fixed
when the app starts; the page only sends images. Uploads are decoded by `images.open_photo`, so a corrupt or
non-image file, or one too large, gets a message on the page and the app goes on serving.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from PIL import Image

from . import DISCLAIMER
from .config import APP_HOST, APP_PORT, MAX_UPLOAD_MB
from .errors import SkinCancerError
from .images import open_photo
from .labels import DX_NAMES, task_of
from .predict import load
from .predictor import Predictor

Outputs = tuple[str, Any, Any, Any]  # the page's outputs: verdict, call, result as data, Grad-CAM
MAX_LESION_PHOTOS = 8  # HAM10000 has at most 6 photos of a lesion; each costs a Grad-CAM pass on the CPU

INTRO = f"""# skincancer: a dermoscopy classifier

> **{DISCLAIMER}** It was trained on HAM10000 dermoscopy photos from a few centres and skin types and can fail
> silently on other cameras, skin tones and populations. See a dermatologist about any lesion that worries you.

Upload a dermoscopy photo of one lesion, or take one with the camera; several photos of the same lesion are called
together in the third tab. A photo that does not look like dermoscopy (a face, a room, a screenshot) gets no call.
Images are processed on this computer only; Gradio keeps uploads in its temporary folder for at most an hour.
"""


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry from a tool that sees patient photos
    try:
        import gradio  # imported when the app starts: every other command runs without it
    except ImportError:
        raise SkinCancerError("the app needs Gradio: pip install 'gradio>=6,<7' (it is in requirements.txt)") from None
    return gradio


EMPTY_MAP = "Grad-CAM: nothing in this photo raised the malignant score, so its map is empty."
NO_MAP = ("Grad-CAM needs the network's gradients, which this model file does not carry: serve the fastai model "
          "(NAME.pkl) to see where the network looked.")


def verdict(clf: Predictor, result: dict, photos: list[str] | None = None, note: str = "") -> str:
    """Markdown: the call at the operating threshold, the probability of malignancy, a dx model's top diagnosis.

    With `photos` (the file names of a lesion's photos, in `result["photos"]`'s order), the probability is the mean
    of theirs and a table gives each photo's own.
    """
    rule = clf.card.threshold_rule
    chosen = (f", chosen for {rule['target_sensitivity']:.0%} sensitivity on the validation split"
              if isinstance(rule, dict) and "target_sensitivity" in rule else "")
    head = ("Malignant: worth a closer look" if result["call"] == "malignant"
            else "Benign by this model's threshold")
    seven = task_of(clf.classes) == "dx"
    summed = " (mel + bcc + akiec" + (", calibrated)" if clf.calibration else ")") if seven else ""
    mean = f", mean of the {len(photos)} photos of this lesion" if photos and len(photos) > 1 else ""
    text = (f"### {head}\n\nProbability of malignancy{summed}{mean} **{result['malignant_probability']:.2f}** "
            f"(operating threshold {clf.threshold:.2f}{chosen}).")
    cal = clf.calibration
    if cal and cal.get("n") and cal.get("n_malignant") is not None:
        # a calibrated probability holds for the population it was fitted on, not for this person
        text += (f" Calibrated on {cal['n']:,} validation photos of which {cal['n_malignant'] / cal['n']:.0%} were "
                 "malignant: where malignancy is rarer, it overstates the chance; it is not a personal risk.")
    if seven:
        label = result["label"]
        text += (f"\n\nMost likely diagnosis: **{label}** ({DX_NAMES.get(label, label)}, "
                 f"{'network score' if clf.calibration else 'probability'} "
                 f"{result['probabilities'].get(label, float('nan')):.2f}).")
    if photos:
        rows = [f"| {i} | {markdown_text(name)} | {r['malignant_probability']:.2f} | {r['call']} |"
                for i, (name, r) in enumerate(zip(photos, result["photos"]), 1)]
        text += ("\n\nEach photo on its own (Grad-CAM left to right):\n\n| | photo | probability | call |"
                 "\n|---|---|---|---|\n" + "\n".join(rows))
    if note:
        text += f"\n\n{note}"
    return f"{text}\n\n*{DISCLAIMER}*"


def refusal(result: dict, photos: list[str] | None = None) -> str:
    """Markdown for a photo (or a lesion's photos) the dermoscopy check refused: what was found, and no call."""
    failed = [name for name, r in zip(photos, result["photos"]) if r.get("dermoscopy") is False] if photos else []
    which = (f"{len(failed)} of the {len(photos)} photos ({', '.join(markdown_text(n) for n in failed)}) do"
             if photos else "This photo does")
    score = max(r["check_score"] for r in result["photos"] if r.get("dermoscopy") is False) if photos \
        else result["check_score"]
    threshold = result["photos"][0]["check_threshold"] if photos else result["check_threshold"]
    return (f"### Not judged: not a dermoscopy photo\n\n{which} not look like the dermoscopy photos this model was "
            f"trained on (check score {score:.2f}, above {threshold:.2f}), so it makes no call. It judges "
            "dermoscopy photos of one skin lesion only: upload one of those."
            f"\n\n*{DISCLAIMER}*")


def markdown_text(text: str) -> str:
    """`text` (an uploaded file's name) shown as it is in Markdown: its punctuation escaped, so `|` keeps a table."""
    return re.sub(r"([\\`*_\[\]|<>~])", r"\\\1", text)


def result_data(result: dict) -> dict:
    """What an API client reads of a result: the call, the calibrated probability and threshold, the class scores."""
    keys = ("call", "label", "malignant_probability", "threshold", "probabilities", "dermoscopy", "check_score",
            "check_threshold", "reason", "lesion", "photos")
    return {k: result[k] for k in keys if k in result}


def analyse(clf: Predictor, path: str | None, max_bytes: int = int(MAX_UPLOAD_MB * 1e6)) -> Outputs:
    """(Markdown verdict, the call, the result as data, Grad-CAM overlay) for an upload; a message when unusable."""
    if not path:
        return "Upload a photo of a lesion, or take one with the camera.", None, None, None
    try:
        image = _open_upload(path, max_bytes)
    except SkinCancerError as e:
        return str(e), None, None, None
    if not clf.can_explain:
        result = clf.predict(image)
        if "reason" in result:
            return refusal(result), None, result_data(result), None
        return verdict(clf, result, note=NO_MAP), result["call"], result_data(result), None
    result, heat, overlay = clf.explain(image)
    if "reason" in result:  # no call, so no map of where it looked for one
        return refusal(result), None, result_data(result), None
    note = "" if heat.max() > 0 else EMPTY_MAP
    return verdict(clf, result, note=note), result["call"], result_data(result), overlay


def analyse_lesion(clf: Predictor, paths: list[str] | None, max_bytes: int = int(MAX_UPLOAD_MB * 1e6),
                   max_photos: int = MAX_LESION_PHOTOS) -> Outputs:
    """(Markdown verdict, the call, the result as data, Grad-CAMs side by side) for several photos of one lesion."""
    paths = [p for p in paths or [] if p]
    if not paths:
        return "Upload two or more photos of the same lesion (select them together).", None, None, None
    if len(paths) > max_photos:
        return (f"{len(paths)} photos is over this app's limit of {max_photos} for one lesion. "
                "Upload the photos of one lesion only."), None, None, None
    try:
        # every photo or none: a call on the readable ones would be about fewer photos than were given
        images = [_open_upload(p, max_bytes) for p in paths]
    except SkinCancerError as e:
        return str(e), None, None, None
    names = [Path(p).name for p in paths]
    if not clf.can_explain:
        result = clf.predict_lesion(images)
        if "reason" in result:
            return refusal(result, names), None, result_data(result), None
        return verdict(clf, result, names, note=NO_MAP), result["call"], result_data(result), None
    result, overlays = clf.explain_lesion(images)
    if "reason" in result:
        return refusal(result, names), None, result_data(result), None
    return verdict(clf, result, names), result["call"], result_data(result), side_by_side(overlays)


def _open_upload(path: str, max_bytes: int):
    """The uploaded photo at `path`, or a SkinCancerError whose message, for the page, names it by its file name."""
    file = Path(path)
    name, size = markdown_text(file.name), file.stat().st_size
    if size > max_bytes:
        raise SkinCancerError(f"**{name}** is {size / 1e6:.1f} MB, over this app's limit of {max_bytes / 1e6:.0f} MB. "
                              "Upload a smaller photo.")
    try:
        return open_photo(file)
    except SkinCancerError as e:
        reason = str(e).replace(str(file), name)  # the user knows the file by its name, not Gradio's temporary path
        raise SkinCancerError(f"Could not use this upload: {reason}. Upload a JPEG or PNG photo of one lesion.") \
            from None


def side_by_side(images: list, height: int = 300, gap: int = 8):
    """One RGB image of `images` in a row, each scaled to `height` pixels high, on white."""
    scaled = [im.convert("RGB").resize((max(1, round(im.width * height / im.height)), height), Image.Resampling.BICUBIC)
              for im in images]
    row = Image.new("RGB", (sum(im.width for im in scaled) + gap * (len(scaled) - 1), height), "white")
    x = 0
    for im in scaled:
        row.paste(im, (x, 0))
        x += im.width + gap
    return row


def build_app(clf: Predictor, max_upload_mb: float = MAX_UPLOAD_MB):
    """The Gradio Blocks page for `clf`: upload, camera and lesion tabs; verdict, class probabilities, Grad-CAM."""
    gr = _gradio()

    max_bytes = int(max_upload_mb * 1e6)

    def run(path):
        return analyse(clf, path, max_bytes)

    def run_lesion(paths):
        return analyse_lesion(clf, paths, max_bytes)

    with gr.Blocks(title="skincancer (research tool, not a diagnosis)", analytics_enabled=False,
                   delete_cache=(600, 3600)) as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column():
                with gr.Tab("Upload"):
                    upload = gr.File(label=f"Lesion photo (JPEG or PNG, up to {max_upload_mb:g} MB)",
                                     file_types=["image"], type="filepath", elem_id="upload")
                with gr.Tab("Camera"):
                    # image_mode=None: the snapshot's path is passed on as it is, decoded only by open_photo
                    camera = gr.Image(label="Camera", sources=["webcam"], type="filepath", image_mode=None,
                                      elem_id="camera")
                with gr.Tab("Several photos of one lesion"):
                    photos = gr.File(label=f"Photos of the same lesion (up to {MAX_LESION_PHOTOS}, each up to "
                                           f"{max_upload_mb:g} MB)", file_count="multiple", file_types=["image"],
                                     type="filepath", elem_id="lesion")
            with gr.Column():
                # every output has a label: it names the output for API clients too (gradio_client, /gradio_api)
                result = gr.Markdown(label="verdict", elem_id="verdict")
                # the call at the operating threshold, as the verdict says it (not the class with the top score)
                call = gr.Label(label="call", elem_id="call")
                overlay = gr.Image(label="Grad-CAM: where the network looked for malignancy", type="pil",
                                   interactive=False, elem_id="gradcam")
                with gr.Accordion("The result as data", open=False):
                    data = gr.JSON(label="result", elem_id="result")
        outputs = [result, call, data, overlay]
        # one prediction at a time across both inputs: a fastai learner is not safe to call from several threads
        one_at_a_time = dict(concurrency_limit=1, concurrency_id="model")
        upload.upload(run, upload, outputs, api_name="predict_upload", **one_at_a_time)
        camera.change(run, camera, outputs, api_name="predict_camera", **one_at_a_time)
        photos.upload(run_lesion, photos, outputs, api_name="predict_lesion", **one_at_a_time)
        upload.clear(lambda: run(None), None, outputs, api_name=False)
        photos.clear(lambda: run_lesion(None), None, outputs, api_name=False)
    return demo


def serve(model: str | Path, host: str = APP_HOST, port: int = APP_PORT, max_upload_mb: float = MAX_UPLOAD_MB,
          trusted: bool = False) -> None:
    """Load the model and serve the app until interrupted; binds to APP_HOST (this machine) unless told otherwise.

    Gradio enforces `max_upload_mb` before an upload is stored."""
    gr = _gradio()
    if max_upload_mb <= 0:
        raise SkinCancerError(f"max_upload_mb: {max_upload_mb} must be positive")
    clf = load(model, trusted=trusted)
    demo = build_app(clf, max_upload_mb)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host}: anyone who can reach this machine can use the app (no login)")
    print(DISCLAIMER)
    print(f"starting the app for {clf.path.name} at http://{host}:{port} (Ctrl+C stops it)", flush=True)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    try:
        # no share link and no web fonts: patient photos and the page stay on this machine
        demo.launch(server_name=host, server_port=port, max_file_size=f"{int(max_upload_mb * 1e6)}b", share=False,
                    ssr_mode=False, footer_links=[], theme=theme, quiet=True)
    except OSError as e:  # Gradio's words for a port in use or an address this machine does not have
        raise SkinCancerError(f"--host {host} --port {port}: cannot listen there ({str(e).split('. ')[0]}); "
                              "pick another --port") from None
