"""Downloading HAM10000: a real HTTP server on 127.0.0.1 serving archives built from a few shared images."""

from __future__ import annotations

import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from skincancer import SkinCancerError, cli
from skincancer.data import read_metadata
from skincancer.labels import DX_CLASSES
from skincancer.download import MANIFEST, TRAINING_FILES, download


class Server:
    """Serves `files` with Range support; records each request; can cut a response short once."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests, self.cut = files, [], {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                body = data[start:]
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in server.cut:  # announce the whole file, send part of it, hang up
                    body = body[: server.cut.pop(name)]
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/isic/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def names(self):
        return [name for name, _ in self.requests]


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def isic_files(ham_dir, small_rows):
    """The three ISIC 2018 Task 3 training files, built from ~40 shared images."""
    rows = small_rows
    images = {f"ISIC2018_Task3_Training_Input/{i}.jpg": (ham_dir / "images" / f"{i}.jpg").read_bytes()
              for i in rows["image_id"]}
    gt = pd.DataFrame({"image": rows["image_id"], **{d.upper(): (rows["dx"] == d).astype(float) for d in DX_CLASSES}})
    groups = rows.rename(columns={"image_id": "image"})[["image", "lesion_id"]]
    return {
        "ISIC2018_Task3_Training_Input.zip": _zip(images),
        "ISIC2018_Task3_Training_GroundTruth.zip": _zip(
            {"ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv":
                 gt.to_csv(index=False).encode()}),
        "ISIC2018_Task3_Training_LesionGroupings.csv": groups.to_csv(index=False).encode(),
    }


def test_full_download_loads_for_training_and_a_second_run_sends_nothing(tmp_path, isic_files, small_rows):
    dest = tmp_path / "ham"
    with Server(isic_files) as server:
        assert cli.main(["download", "--dest", str(dest), "--mirror", server.url]) == 0
        assert sorted(server.names()) == sorted(TRAINING_FILES)
        df = read_metadata(dest)
        assert len(df) == len(small_rows) and set(df["image_id"]) == set(small_rows["image_id"])
        manifest = json.loads((dest / MANIFEST).read_text())
        assert all(len(manifest[n]["sha256"]) == 64 for n in TRAINING_FILES)
        before = len(server.requests)
        download(dest, mirror=server.url)
        assert len(server.requests) == before  # idempotent: no traffic at all


def test_an_interrupted_download_resumes_with_a_range_request(tmp_path, isic_files):
    dest, name = tmp_path / "ham", "ISIC2018_Task3_Training_Input.zip"
    size = len(isic_files[name])
    with Server(isic_files) as server:
        server.cut[name] = size // 2
        with pytest.raises(SkinCancerError, match=rf"got {size // 2:,} of {size:,} bytes; run the same command again"):
            download(dest, mirror=server.url, show_progress=False)
        assert not (dest / "ISIC2018_Task3_Training_Input").exists() and not (dest / name).exists()
        assert (dest / f"{name}.part").stat().st_size == size // 2  # a half file never looks whole
        download(dest, mirror=server.url, show_progress=False)
        assert (name, f"bytes={size // 2}-") in server.requests
        assert (dest / name).read_bytes() == isic_files[name] and not (dest / f"{name}.part").exists()
    assert len(read_metadata(dest)) > 0


def test_a_corrupt_archive_is_a_clear_error_and_leaves_nothing_behind(tmp_path, isic_files):
    name = "ISIC2018_Task3_Training_Input.zip"
    data = bytearray(isic_files[name])
    data[len(data) // 3] ^= 0xFF  # inside an image's stored bytes: the CRC no longer matches
    files = {**isic_files, name: bytes(data)}
    dest = tmp_path / "ham"
    with Server(files) as server:
        with pytest.raises(SkinCancerError, match=rf"{name}: corrupt archive, CRC check failed"):
            download(dest, mirror=server.url, show_progress=False)
    assert sorted(p.name for p in dest.iterdir()) == []  # no archive, no part file, no half extraction


def test_a_zip_slip_archive_is_rejected(tmp_path, isic_files):
    name = "ISIC2018_Task3_Training_GroundTruth.zip"
    files = {**isic_files, name: _zip({"../../escaped.txt": b"owned", "/abs.txt": b"owned"})}
    dest = tmp_path / "deep" / "ham"
    with Server(files) as server:
        with pytest.raises(SkinCancerError, match=r"refusing to extract 2 unsafe entr\(ies\)"):
            download(dest, mirror=server.url, show_progress=False)
    assert not list(tmp_path.rglob("escaped.txt")) and not (dest / name).exists()


def test_a_file_changed_after_download_is_fetched_again(tmp_path, isic_files):
    dest, name = tmp_path / "ham", "ISIC2018_Task3_Training_LesionGroupings.csv"
    with Server(isic_files) as server:
        download(dest, mirror=server.url, show_progress=False)
        (dest / name).write_text("tampered")
        before = len(server.requests)
        download(dest, mirror=server.url, show_progress=False)
        assert server.names()[before:] == [name]
    assert (dest / name).read_bytes() == isic_files[name]


def test_an_unreachable_mirror_is_one_clear_error(tmp_path, capsys):
    with Server({}) as server:
        url = server.url
    assert cli.main(["download", "--dest", str(tmp_path / "x"), "--mirror", url]) == 2
    assert "could not connect" in capsys.readouterr().err
