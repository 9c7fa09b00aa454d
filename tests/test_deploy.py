"""`serve` deployed as TensorFlow Serving is: TF Serving's own gRPC client answered as the REST
API answers, a base folder of versions rolled out with no failed request, Prometheus metrics
read by Prometheus's own parser, and a cloud platform's AIP_ variables honoured."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

NAME = "cnnmnist"
BANNER_END = "Ctrl-C stops it"


class Served:
    """`cnnmnist serve ARGS` in a process of its own, its ports read from its banner."""

    def __init__(self, *args: str, env: dict | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cnnmnist", "serve", *args],
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
        )
        banner = ""
        while BANNER_END not in banner:
            line = self.process.stderr.readline()
            assert line, f"serve exited: {banner}{self.process.stderr.read()}"
            banner += line
        self.banner = banner
        self.port = int(re.search(r"http://[\d.]+:(\d+)/", banner).group(1))
        grpc = re.search(r"gRPC API +[\d.]+:(\d+)", banner)
        self.grpc_port = int(grpc.group(1)) if grpc else None
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True).start()

    def request(self, method: str, path: str, body=None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            connection.request(method, path, payload, {"Content-Type": "application/json"})
            response = connection.getresponse()
            data = response.read()
            kind = response.getheader("content-type", "")
            answer = json.loads(data) if kind.startswith("application/json") else data
            return response.status, answer, dict(response.getheaders())
        finally:
            connection.close()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=20)
        return self.process.returncode


@pytest.fixture
def serving():
    started: list[Served] = []

    def start(*args: str, env: dict | None = None) -> Served:
        started.append(Served(*args, env=env))
        return started[-1]

    yield start
    for served in started:
        if served.process.poll() is None:
            served.stop()


def _pixels(mnist, n: int) -> np.ndarray:
    return mnist.test_images[:n].astype(np.float32).reshape(n, 28, 28, 1)


def _predict_request(pixels: np.ndarray, name: str = NAME):
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.model_spec.signature_name = "serving_default"
    request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(pixels))
    return request


def test_tf_servings_own_grpc_client_gets_what_rest_gives(serving, trained, mnist):
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_service_pb2_grpc,
        prediction_service_pb2_grpc,
    )

    served = serving(str(trained.checkpoint), "--port", "0", "--grpc-port", "0")
    channel = grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    pixels = _pixels(mnist, 5)
    answer = stub.Predict(_predict_request(pixels), 30)
    probabilities = tf.make_ndarray(answer.outputs["probabilities"])
    status, rest, _ = served.request(
        "POST", f"/v1/models/{NAME}:predict", {"instances": pixels.tolist()}
    )
    assert status == 200
    np.testing.assert_allclose(probabilities, rest["predictions"], atol=1e-6)  # row by row
    assert answer.model_spec.name == NAME and answer.model_spec.version.value == 1

    metadata = get_model_metadata_pb2.GetModelMetadataRequest()
    metadata.model_spec.name = NAME
    metadata.metadata_field.append("signature_def")
    signatures = get_model_metadata_pb2.SignatureDefMap()
    stub.GetModelMetadata(metadata, 30).metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert [d.size for d in signature.inputs["pixels"].tensor_shape.dim] == [-1, 28, 28, 1]
    assert [d.size for d in signature.outputs["probabilities"].tensor_shape.dim] == [-1, 10]

    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = NAME
    versions = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status_request, 30)
    (version,) = versions.model_version_status
    assert version.version == 1
    assert version.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE

    # Malformed requests get status codes, and the server keeps answering.
    refusals = [
        (_predict_request(pixels, name="other"), grpc.StatusCode.NOT_FOUND, "Servable not found"),
        (_predict_request(pixels[:, :14]), grpc.StatusCode.INVALID_ARGUMENT, "[N, 28, 28, 1]"),
        (_predict_request(pixels * 1000), grpc.StatusCode.INVALID_ARGUMENT, "0..255"),
    ]
    wrong_signature = _predict_request(pixels)
    wrong_signature.model_spec.signature_name = "classify"
    refusals.append((wrong_signature, grpc.StatusCode.INVALID_ARGUMENT, "signature"))
    wrong_input = _predict_request(pixels)
    wrong_input.inputs["image"].CopyFrom(wrong_input.inputs.pop("pixels"))
    refusals.append((wrong_input, grpc.StatusCode.INVALID_ARGUMENT, "one input"))
    for request, code, words in refusals:
        with pytest.raises(grpc.RpcError) as refused:
            stub.Predict(request, 30)
        assert refused.value.code() == code and words in refused.value.details()
    assert stub.Predict(_predict_request(pixels[:1]), 30).outputs["probabilities"].tensor_shape.dim
    assert served.stop() == 0


def _checkpoint_into(source, target) -> None:
    """Copy a checkpoint in as `train` writes one: whole, then renamed into place."""
    staging = target.with_name(f".{target.name}.tmp")
    shutil.copytree(source, staging)
    os.rename(staging, target)


def test_a_new_version_is_rolled_out_under_load_with_no_failed_request(
    serving, trained, tmp_path, mnist
):
    base = tmp_path / "models"
    base.mkdir()
    _checkpoint_into(trained.checkpoint, base / "1")
    served = serving(str(base), "--port", "0", "--poll-seconds", "0.3")
    assert "version 1 of" in served.banner
    body = {"instances": _pixels(mnist, 1).tolist()}
    outcomes: list[tuple[int, str]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                status, _, headers = served.request("POST", f"/v1/models/{NAME}:predict", body)
                outcomes.append((status, headers.get("x-model-version", "")))
            except OSError as e:
                outcomes.append((0, repr(e)))

    clients = [threading.Thread(target=load) for _ in range(4)]
    for client in clients:
        client.start()
    time.sleep(1.0)
    _checkpoint_into(trained.checkpoint, base / "2")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = served.request("GET", f"/v1/models/{NAME}")[1]["model_version_status"]
        if {v["version"]: v["state"] for v in status}.get("2") == "AVAILABLE":
            break
        time.sleep(0.1)
    time.sleep(1.0)
    stop.set()
    for client in clients:
        client.join()
    failed = [o for o in outcomes if o[0] != 200]
    assert failed == []
    versions = [v for _, v in outcomes]
    assert versions.count("1") > 10 and versions.count("2") > 10  # across the swap
    assert versions.index("2") > versions.index("1")
    states = {v["version"]: v["state"] for v in status}
    assert states == {"2": "AVAILABLE", "1": "END"}
    assert served.request("GET", f"/v1/models/{NAME}/versions/2/metadata")[0] == 200
    assert served.request("GET", f"/v1/models/{NAME}/versions/1/metadata")[0] == 404

    # A damaged new version is refused with a log line; version 2 keeps answering.
    staging = base / ".3.tmp"
    shutil.copytree(trained.checkpoint, staging)
    (staging / "cnnmnist.json").write_text("{damaged")
    os.rename(staging, base / "3")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any("version 3" in line for line in served.log):
        time.sleep(0.1)
    assert any("version 3 of 'cnnmnist' was not loaded" in line for line in served.log)
    status, answer, headers = served.request("POST", f"/v1/models/{NAME}:predict", body)
    assert status == 200 and headers["x-model-version"] == "2"
    listed = served.request("GET", f"/v1/models/{NAME}")[1]["model_version_status"]
    damaged = next(v for v in listed if v["version"] == "3")
    assert damaged["state"] == "END" and "corrupted metadata" in damaged["status"]["error_message"]
    assert served.stop() == 0


def test_the_metrics_page_is_prometheus_text(serving, trained, mnist):
    from prometheus_client.parser import text_string_to_metric_families

    served = serving(str(trained.checkpoint), "--port", "0")
    body = {"instances": _pixels(mnist, 3).tolist()}
    for _ in range(3):
        assert served.request("POST", f"/v1/models/{NAME}:predict", body)[0] == 200
    assert served.request("POST", f"/v1/models/{NAME}:predict", {"instances": []})[0] == 400
    status, page, headers = served.request("GET", "/monitoring/prometheus/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(page.decode())}
    requests = {
        (s.labels["api"], s.labels["version"], s.labels["status"]): s.value
        for s in families["cnnmnist_requests"].samples
        if s.name == "cnnmnist_requests_total"
    }
    assert requests[("rest", "1", "200")] == 3
    assert requests[("rest", "", "400")] == 1
    timed = [
        s.value
        for s in families["cnnmnist_request_latency_seconds"].samples
        if s.name == "cnnmnist_request_latency_seconds_count"
    ]
    assert sum(timed) >= 4
    batches = {
        s.labels.get("le"): s.value
        for s in families["cnnmnist_batch_size"].samples
        if s.name.endswith("_bucket")
    }
    assert batches["4.0"] == 3  # three model calls of three images each


def test_a_cloud_platforms_variables_are_honoured(serving, trained, mnist):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        "AIP_HTTP_PORT": str(port),
        "AIP_HEALTH_ROUTE": "/health",
        "AIP_PREDICT_ROUTE": "/v1/endpoints/1/deployedModels/2:predict",
    }
    served = serving(str(trained.checkpoint), env=env)
    assert served.port == port
    assert "listening on every network interface" in served.banner
    status, answer, _ = served.request("GET", "/health")
    assert status == 200 and answer["status"] == "ok"
    pixels = _pixels(mnist, 2)
    status, answer, _ = served.request(
        "POST", env["AIP_PREDICT_ROUTE"], {"instances": pixels.tolist()}
    )
    reference = served.request("POST", f"/v1/models/{NAME}:predict", {"instances": pixels.tolist()})
    assert status == 200 and answer["predictions"] == reference[1]["predictions"]
    assert served.stop() == 0


def test_a_bad_platform_port_is_a_usage_error(trained):
    result = subprocess.run(
        [sys.executable, "-m", "cnnmnist", "serve", str(trained.checkpoint)],
        env=dict(os.environ, AIP_HTTP_PORT="eighty"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "AIP_HTTP_PORT='eighty' is not a port number" in result.stderr


def test_the_access_log_is_uvicorns_line_and_off_by_default(serving, trained):
    quiet = serving(str(trained.checkpoint), "--port", "0")
    logged = serving(str(trained.checkpoint), "--port", "0", "--access-log")
    for served in (quiet, logged):
        assert served.request("GET", f"/v1/models/{NAME}")[0] == 200
        assert served.stop() == 0
    time.sleep(0.2)
    assert [line for line in quiet.log if "GET" in line] == []
    assert any(
        re.fullmatch(rf'127\.0\.0\.1:\d+ - "GET /v1/models/{NAME} HTTP/1\.1" 200\n', line)
        for line in logged.log
    )


def test_the_access_log_escapes_what_a_client_puts_in_the_path(serving, trained):
    logged = serving(str(trained.checkpoint), "--port", "0", "--access-log")
    assert logged.request("GET", "/%1b%5b2J%1b%5b31mEVIL")[0] == 404
    assert logged.stop() == 0
    time.sleep(0.2)
    lines = [line for line in logged.log if "EVIL" in line]
    assert lines and not any("\x1b" in line for line in lines)  # shown, never obeyed
