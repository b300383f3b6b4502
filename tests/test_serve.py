"""`anomap serve`: a real uvicorn process on a free 127.0.0.1 port, called over HTTP with httpx."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomap import PatchCore, load
from anomap.cli import main
from anomap.pictures import heat_range, heatmap_overlay, segmentation
from anomap.runs import demo_root

from conftest import assert_close_scaled

httpx = pytest.importorskip("httpx", reason="httpx is in the dev extra")
pytest.importorskip("fastapi", reason="anomap serve needs the serve extra")

DEMO = demo_root() / "hazelnut_toy"
BAD = sorted((DEMO / "test" / "colour").glob("*.jpg"))
GOOD = sorted((DEMO / "test" / "good").glob("*.jpg"))
TOKEN = "s3cret-token-for-tests-0123456789"
# scores of one image alone and in a batch: the same arithmetic on the same numbers (each image is
# scored on its own), so they agree to float32 rounding at most
BATCH_RTOL = 1e-5


class Server:
    """`anomap serve MODEL --port 0 ARGS` as a subprocess; its output goes to `log`."""

    def __init__(self, model: Path, log: Path, *args: str) -> None:
        self.log = log
        cmd = [sys.executable, "-m", "anomap.cli", "serve", str(model), "--port", "0", *args]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            self.url = self._wait_for_address()
            self._wait_for_health()
        except BaseException:
            self.stop()
            raise

    def _wait_for_address(self, timeout: float = 90) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in self.output().splitlines():
                if line.startswith("anomap: serving"):
                    return line.split(" on ")[1].split()[0]
            if self.proc.poll() is not None:
                raise RuntimeError(f"anomap serve exited with {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.1)
        raise TimeoutError(f"anomap serve printed no address:\n{self.output()}")

    def _wait_for_health(self, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if httpx.get(self.url + "/health", timeout=2).json() == {"status": "ok"}:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError(f"/health did not answer:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def fit_demo_model(folder: Path) -> Path:
    """A tiny PatchCore fitted on the bundled hazelnut_toy training images (128 px, real weights)."""
    train = sorted((DEMO / "train" / "good").glob("*.jpg"))
    det = PatchCore(backbone="efficientnet_lite0", image_size=128, device="cpu").fit(train)
    return det.save(folder / "hazelnut.anomap")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return fit_demo_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def detector(model_file):
    return load(model_file, device="cpu")


@pytest.fixture(scope="module")
def server(model_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    (folder / "token").write_text(TOKEN + "\n")
    srv = Server(
        model_file,
        folder / "log.txt",
        "--token-file",
        str(folder / "token"),
        "--max-batch",
        "4",
        "--max-upload-mb",
        "1",
    )
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def api(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
        yield client


def raw(path: Path) -> dict:
    return {"content": path.read_bytes(), "headers": {"Content-Type": "image/jpeg"}}


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def decoded(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


# --- happy paths -------------------------------------------------------------------------------


def test_health_page_and_docs_answer_without_token(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for name in ("page.js", "page.css"):
        assert f"/static/{name}" in page.text
        assert httpx.get(f"{server.url}/static/{name}").status_code == 200
    assert httpx.get(server.url + "/docs").status_code == 200
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/health", "/v1/model", "/v1/predict", "/v1/predict/batch"} <= set(spec["paths"])


def test_page_files_load_nothing_from_elsewhere():
    folder = Path(__file__).parents[1] / "src" / "anomap" / "serve" / "static"
    for path in folder.iterdir():
        assert "//" not in path.read_text().replace("// ", ""), f"{path.name} refers to another host"


def test_model_describes_the_file(api, model_file, detector):
    info = api.get("/v1/model").json()
    assert info["method"] == "patchcore" and info["backbone"] == "efficientnet_lite0"
    assert info["input_size"] == 128
    assert info["threshold"] == pytest.approx(detector.threshold_)
    assert info["sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert info["format_version"] == 4 and info["anomap_version"]
    assert info["limits"]["max_batch"] == 4


def test_predict_matches_offline_predict(api, detector):
    expected = detector.predict([BAD[0], GOOD[0]])
    multipart = api.post("/v1/predict", files={"file": ("a.jpg", BAD[0].read_bytes(), "image/jpeg")}).json()
    body = api.post("/v1/predict", **raw(GOOD[0])).json()
    assert_close_scaled([multipart["score"], body["score"]], expected.scores)
    assert [multipart["is_anomalous"], body["is_anomalous"]] == [True, False] == list(expected.labels.astype(bool))
    assert multipart["threshold"] == pytest.approx(detector.threshold_)
    assert (multipart["width"], multipart["height"]) == Image.open(BAD[0]).size
    assert set(multipart["timing_ms"]) >= {"total", "score"} and "mask" not in multipart and "heatmap" not in multipart


def test_mask_and_heatmap_are_pngs_at_the_image_size(api, detector):
    image = np.asarray(Image.open(BAD[1]).convert("RGB").resize((300, 200)))
    answer = api.post("/v1/predict?mask=1&heatmap=1", content=png(image), headers={"Content-Type": "image/png"}).json()
    pred = detector.predict([image])
    mask, heat = decoded(answer["mask"]), decoded(answer["heatmap"])
    assert mask.shape == (200, 300) and set(np.unique(mask)) <= {0, 255}
    expected = segmentation(pred.maps[0] >= detector.threshold_, (200, 300))
    assert np.mean(mask != expected) < 1e-3  # only pixels within rounding of the threshold may differ
    assert mask.any()
    assert heat.shape == (200, 300, 3) and np.abs(heat.astype(int) - image).mean() > 10
    same = heatmap_overlay(image, pred.maps[0], *heat_range(detector.normal_scores_))  # as `anomap predict` draws
    differs = np.abs(heat.astype(int) - same).max(axis=2) > 2
    assert differs.mean() < 1e-3  # a colour apart only where the map is within rounding of a colour step


def test_batch_answers_in_order(api):
    paths = [BAD[2], GOOD[1], BAD[3]]
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    results = api.post("/v1/predict/batch", files=files).json()["results"]
    singles = [api.post("/v1/predict", **raw(p)).json()["score"] for p in paths]
    assert len(results) == 3
    np.testing.assert_allclose([r["score"] for r in results], singles, rtol=BATCH_RTOL)


def test_scores_do_not_depend_on_the_batch(api):
    target, others = BAD[4], [*GOOD[2:5], *BAD[5:8]]
    alone = api.post("/v1/predict", **raw(target)).json()
    assert alone["batch_size"] == 1
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in [others[0], target, *others[1:3]]]
    batched = api.post("/v1/predict/batch", files=files).json()["results"][1]
    with ThreadPoolExecutor(8) as pool:  # concurrent requests, grouped by the server as they come
        mixed = list(pool.map(lambda p: api.post("/v1/predict", **raw(p)).json(), [target, *others, target]))
    assert batched["batch_size"] == 4 and max(m["batch_size"] for m in mixed) > 1
    for answer in (batched, mixed[0], mixed[-1]):
        np.testing.assert_allclose(answer["score"], alone["score"], rtol=BATCH_RTOL)


# --- the token ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header", [None, "Bearer wrong-token-0123456789abcdef", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer", TOKEN]
)
def test_v1_needs_the_token(server, header):
    headers = {} if header is None else {"Authorization": header}
    for method, path in (("GET", "/v1/model"), ("POST", "/v1/predict"), ("POST", "/v1/predict/batch")):
        body = GOOD[0].read_bytes() if method == "POST" else None
        headers["Content-Type"] = "image/jpeg"
        answer = httpx.request(method, server.url + path, headers=headers, content=body)
        assert answer.status_code == 401, (method, path)
        assert "token" in answer.json()["error"] and answer.headers["www-authenticate"] == "Bearer"


def test_token_never_appears_in_logs_or_answers(api, server):
    answers = [
        api.get("/v1/model").text,
        api.post("/v1/predict?mask=1", **raw(GOOD[0])).text,
        httpx.get(server.url + "/v1/model", headers={"Authorization": f"Bearer {TOKEN[:-1]}"}).text,
    ]
    assert all(TOKEN not in a and TOKEN[:12] not in a for a in answers)
    log = server.output()
    assert "GET /v1/model" in log and TOKEN[:12] not in log


# --- bad input ---------------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, with one tiny data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="GIF")
    return buf.getvalue()


def bad_requests() -> list[tuple[str, int, dict]]:
    """(name, expected status, httpx.post keyword arguments) of every kind of bad request."""
    whole = png(np.full((64, 64, 3), 128, np.uint8))
    image = {"Content-Type": "image/png"}
    boundary = {"Content-Type": "multipart/form-data; boundary=xyz"}
    return [
        ("not an image", 415, {"content": b"hello, world" * 10, "headers": image}),
        ("gif", 415, {"content": gif(), "headers": image}),
        ("truncated", 400, {"content": whole[: len(whole) // 2], "headers": image}),
        ("bomb", 400, {"content": png_header(30000, 30000), "headers": image}),
        ("too small", 400, {"content": png(np.zeros((4, 4, 3), np.uint8)), "headers": image}),
        ("wrong content type", 415, {"content": whole, "headers": {"Content-Type": "text/plain"}}),
        ("json", 415, {"json": {"image": "x"}}),
        ("no content type", 415, {"content": whole}),
        ("empty body", 400, {"content": b"", "headers": image}),
        ("empty file", 400, {"files": {"file": ("a.png", b"", "image/png")}}),
        ("part of another type", 415, {"files": {"file": ("a.txt", whole, "text/plain")}}),
        ("two files", 400, {"files": [("file", (f"{n}.png", whole, "image/png")) for n in "ab"]}),
        ("no boundary", 400, {"content": whole, "headers": {"Content-Type": "multipart/form-data"}}),
        ("no parts", 400, {"content": b"--xyz--\r\n", "headers": boundary}),
        (
            "unfinished multipart",
            400,
            {"content": b"--xyz\r\nContent-Type: image/png\r\n\r\n" + whole, "headers": boundary},
        ),
        ("over the limit", 413, {"content": b"\0" * (2**20 + 1), "headers": image}),
        ("bad query", 422, {"params": {"mask": "perhaps"}, "content": whole, "headers": image}),
    ]


@pytest.mark.parametrize("name,status,kwargs", bad_requests(), ids=[b[0] for b in bad_requests()])
def test_bad_input_gets_a_json_error(api, name, status, kwargs):
    answer = api.post("/v1/predict", **kwargs)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json" and answer.json()["error"]


def test_bad_batches_are_refused(api):
    whole = png(np.full((64, 64, 3), 128, np.uint8))
    raw_batch = api.post("/v1/predict/batch", content=whole, headers={"Content-Type": "image/png"})
    assert raw_batch.status_code == 415
    too_many = api.post("/v1/predict/batch", files=[("files", (f"{i}.png", b"x", "image/png")) for i in range(65)])
    assert too_many.status_code == 400 and "at most 64" in too_many.json()["error"]
    one_bad = api.post(
        "/v1/predict/batch",
        files=[("files", ("a.png", whole, "image/png")), ("files", ("b.png", b"not an image", "image/png"))],
    )
    assert one_bad.status_code == 415 and one_bad.json()["error"].startswith("files[1]")


def test_oversized_body_is_refused_before_it_is_read(server):
    """A declared 5 GB body, and an unfinished chunked body past the limit, get 413 at once."""
    host, port = server.url.removeprefix("http://").split(":")
    head = f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nAuthorization: Bearer {TOKEN}\r\n"
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(head.encode() + b"Content-Length: 5000000000\r\n\r\n" + b"\0" * 1024)
        assert sock.recv(64).startswith(b"HTTP/1.1 413")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(head.encode() + b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(20):  # 1.25 MiB in 64 KiB chunks, and no final chunk
            sock.sendall(b"10000\r\n" + b"\0" * 65536 + b"\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 413")


def test_requests_beyond_max_pending_get_503_at_once(model_file, tmp_path):
    """With --max-pending 1, a request whose body is still arriving holds the only place: a second
    gets a JSON 503 at once, and the first is answered when its body is complete."""
    srv = Server(model_file, tmp_path / "log.txt", "--max-pending", "1")
    body = GOOD[0].read_bytes()
    try:
        host, port = srv.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            head = f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}"
            sock.sendall(head.encode() + b"\r\n\r\n" + body[:100])
            time.sleep(1.0)  # the first request is now in progress, waiting for the rest of its body
            busy = httpx.post(srv.url + "/v1/predict", **raw(GOOD[1]), timeout=60)
            sock.sendall(body[100:])
            first = sock.recv(64)
        after = httpx.post(srv.url + "/v1/predict", **raw(GOOD[1]), timeout=60)
    finally:
        srv.stop()
    assert busy.status_code == 503 and "max-pending" in busy.json()["error"] and busy.headers["retry-after"] == "1"
    assert first.startswith(b"HTTP/1.1 200") and after.status_code == 200


def test_a_burst_of_bad_requests_leaves_the_server_serving(api, server, detector):
    before = api.post("/v1/predict", **raw(BAD[9])).json()["score"]
    kinds = bad_requests()
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda k: api.post("/v1/predict", **k[2]).status_code, kinds * 4))
    assert statuses == [k[1] for k in kinds] * 4
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    after = api.post("/v1/predict", **raw(BAD[9])).json()["score"]
    assert after == before
    assert_close_scaled([after], detector.predict([BAD[9]]).scores)


# --- exported models ---------------------------------------------------------------------------


def test_serves_an_exported_model(detector, tmp_path):
    pytest.importorskip("onnxruntime", reason="exported models are scored by onnxruntime (the onnx extra)")
    from anomap.export import export

    onnx = export(detector, tmp_path / "m.onnx")
    srv = Server(onnx, tmp_path / "log.txt")
    try:
        info = httpx.get(srv.url + "/v1/model").json()
        answers = [httpx.post(srv.url + "/v1/predict?mask=1", **raw(p)).json() for p in (BAD[0], GOOD[0])]
    finally:
        srv.stop()
    assert info["format"] == "anomap-export" and info["method"] == "patchcore" and info["input_size"] == 128
    assert info["sha256"] == hashlib.sha256(onnx.read_bytes()).hexdigest()
    expected = detector.predict([BAD[0], GOOD[0]])
    assert_close_scaled([a["score"] for a in answers], expected.scores)  # onnxruntime's float32 kernels
    assert [a["is_anomalous"] for a in answers] == [True, False]
    assert decoded(answers[0]["mask"]).shape == (512, 512)


# --- the command -------------------------------------------------------------------------------


def test_shutdown_finishes_requests_in_flight(model_file, tmp_path):
    big = np.asarray(Image.open(BAD[0]).convert("RGB").resize((1600, 1600)))
    body = png(big)
    srv = Server(model_file, tmp_path / "log.txt")
    answers, finished = [], []

    def send() -> None:
        answer = httpx.post(
            srv.url + "/v1/predict?mask=1&heatmap=1", content=body, headers={"Content-Type": "image/png"}, timeout=120
        )
        answers.append(answer.status_code)
        finished.append(time.monotonic())

    try:
        threads = [threading.Thread(target=send) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        stopped_at = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        code = srv.proc.wait(60)
    finally:
        srv.stop()
    assert answers == [200] * 4
    assert max(finished) > stopped_at, "every request ended before the signal: nothing was in flight"
    assert code == 0 and "anomap: stopped" in srv.output()
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health")


def test_command_errors_are_one_line(model_file, tmp_path, capsys):
    short = tmp_path / "short"
    short.write_text("abc")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = [
            ([str(tmp_path / "missing.anomap")], "missing.anomap"),
            ([str(model_file), "--token-file", str(short)], "at least 16"),
            ([str(model_file), "--token-file", str(tmp_path / "nope")], "cannot read the token file"),
            ([str(model_file), "--max-batch", "0"], "--max-batch"),
            ([str(model_file), "--max-upload-mb", "0"], "--max-upload-mb"),
            ([str(model_file), "--port", "70000"], "--port"),
            ([str(model_file), "--port", port], "cannot listen"),
        ]
        for args, expected in cases:
            assert main(["serve", *args]) == 2
            err = capsys.readouterr().err
            assert err.startswith("anomap: error:") and expected in err and err.count("\n") == 1, err


def test_warns_when_serving_beyond_this_machine_without_a_token():
    from anomap.serve import exposure_warning

    for host in ("0.0.0.0", "::", "192.168.1.20", "inspection.example"):
        assert "--token-file" in exposure_warning(host, has_token=False)
        assert exposure_warning(host, has_token=True) is None
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert exposure_warning(host, has_token=False) is None


def test_help_does_not_import_the_server():
    code = "import sys; from anomap.cli import build_parser; build_parser(); print('fastapi' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert out.stdout.strip() == "False"
