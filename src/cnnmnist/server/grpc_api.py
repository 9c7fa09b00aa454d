"""TensorFlow Serving's gRPC API (PredictionService: Predict, GetModelMetadata; ModelService:
GetModelStatus) on the protos TF Serving publishes (tensorflow-serving-api), so a client
written for TF Serving talks to `serve` unchanged. The same batcher answers it as the REST
API. Its protos are TensorFlow's: this module imports TensorFlow (a few seconds at start)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent import futures

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_shape_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from cnnmnist.checkpoint import SIGNATURE
from cnnmnist.errors import CnnmnistError
from cnnmnist.server import observe, tfserving
from cnnmnist.server.app import MAX_BODY
from cnnmnist.server.servables import Servable, Servables
from cnnmnist.server.tfserving import INPUT, OUTPUT, HTTPError

THREADS = 16  # requests handled at once; each waits on the batcher, not on the CPU
ANSWER_TIMEOUT = 60.0  # seconds a request waits for the model before it is given up


class _Abort(Exception):
    """A request refused with a gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Handlers:
    """The methods, for the model's versions; each runs on a gRPC thread and waits for the
    batcher on the server's event loop."""

    def __init__(self, servables: Servables) -> None:
        self.servables = servables
        self.loop: asyncio.AbstractEventLoop | None = None
        self.metrics: observe.Metrics | None = None

    def answer(self, method: Callable, request, context):
        """Run `method`, turning its refusals into status codes and counting the request."""
        started, code, model = time.perf_counter(), grpc.StatusCode.OK, None
        try:
            model, response = method(request)
            return response
        except _Abort as e:
            code = e.code
            context.abort(code, str(e))
        except Exception as e:  # noqa: BLE001 - a bug: the client hears INTERNAL, we go on
            code = grpc.StatusCode.INTERNAL
            context.abort(code, f"internal error: {type(e).__name__}")
        finally:
            if self.metrics is not None:
                name = model.name if model else request.model_spec.name[:100]
                version = str(model.version) if model else ""
                self.metrics.answered(
                    "grpc", name, version, code.name, time.perf_counter() - started
                )

    def model(self, spec) -> Servable:
        """The servable a ModelSpec names (NOT_FOUND if none)."""
        if spec.name != self.servables.name:
            raise _Abort(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: {spec.name[:60]!r}; this server serves "
                f"{self.servables.name!r}",
            )
        version = spec.version.value if spec.HasField("version") else None
        try:
            return self.servables.get(version)
        except KeyError:
            raise _Abort(
                grpc.StatusCode.NOT_FOUND,
                f"version {version} of {spec.name!r} is not available; version "
                f"{self.servables.current.version} is",
            ) from None

    def predict(self, request) -> tuple[Servable, predict_pb2.PredictResponse]:
        model = self.model(request.model_spec)
        if request.model_spec.signature_name not in ("", SIGNATURE):
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"signature {request.model_spec.signature_name[:60]!r} not found; this model "
                f"has only {SIGNATURE!r}",
            )
        names = sorted(request.inputs)
        if names != [INPUT]:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the signature has one input, {INPUT!r}; got {names[:5]}",
            )
        try:
            pixels = tfserving.pixels_of(tf.make_ndarray(request.inputs[INPUT]), "inputs")
        except HTTPError as e:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if e.status == 413 else None
            raise _Abort(code or grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except (TypeError, ValueError) as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"inputs: {e}"[:300]) from None
        running = asyncio.run_coroutine_threadsafe(model.run(pixels), self.loop)
        probabilities = running.result(ANSWER_TIMEOUT)
        response = predict_pb2.PredictResponse()
        _spec(response.model_spec, model)
        response.outputs[OUTPUT].CopyFrom(tf.make_tensor_proto(probabilities.astype(np.float32)))
        return model, response

    def metadata(self, request) -> tuple[Servable, get_model_metadata_pb2.GetModelMetadataResponse]:
        model = self.model(request.model_spec)
        unknown = sorted(set(request.metadata_field) - {"signature_def"})
        if unknown or not request.metadata_field:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"metadata_field must be ['signature_def']; got {list(request.metadata_field)[:5]}",
            )
        signatures = get_model_metadata_pb2.SignatureDefMap()
        signatures.signature_def[SIGNATURE].CopyFrom(_signature())
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        _spec(response.model_spec, model)
        response.metadata["signature_def"].Pack(signatures)
        return model, response

    def status(self, request) -> tuple[Servable, get_model_status_pb2.GetModelStatusResponse]:
        model = self.model(request.model_spec)
        wanted = (
            request.model_spec.version.value if request.model_spec.HasField("version") else None
        )
        response = get_model_status_pb2.GetModelStatusResponse()
        for number, state, message in self.servables.statuses():
            if wanted is not None and number != wanted:
                continue
            entry = response.model_version_status.add()
            entry.version = number
            entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(state)
            entry.status.error_message = message
            entry.status.error_code = 0 if not message or state == "AVAILABLE" else 2  # UNKNOWN
        return model, response


def _spec(spec, model: Servable) -> None:
    spec.name = model.name
    spec.version.value = model.version
    spec.signature_name = SIGNATURE


def _signature() -> meta_graph_pb2.SignatureDef:
    """serving_default as TF Serving describes a SavedModel's signature."""

    def info(name: str, dims: list[int]) -> meta_graph_pb2.TensorInfo:
        shape = tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims]
        )
        return meta_graph_pb2.TensorInfo(name=name, dtype=types_pb2.DT_FLOAT, tensor_shape=shape)

    return meta_graph_pb2.SignatureDef(
        inputs={INPUT: info(f"{SIGNATURE}_{INPUT}:0", [-1, 28, 28, 1])},
        outputs={OUTPUT: info("StatefulPartitionedCall:0", [-1, 10])},
        method_name="tensorflow/serving/predict",
    )


class _Predictions(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, handlers: Handlers) -> None:
        self.h = handlers

    def Predict(self, request, context):  # noqa: N802 - the proto's name
        return self.h.answer(self.h.predict, request, context)

    def GetModelMetadata(self, request, context):  # noqa: N802
        return self.h.answer(self.h.metadata, request, context)


class _Models(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, handlers: Handlers) -> None:
        self.h = handlers

    def GetModelStatus(self, request, context):  # noqa: N802
        return self.h.answer(self.h.status, request, context)


def service(servables: Servables, address, port: int):
    """The gRPC server, its port bound now (a busy port fails here, before serving), as an
    app.Service: started with the HTTP server's event loop and metrics."""
    handlers = Handlers(servables)
    server = grpc.server(
        futures.ThreadPoolExecutor(THREADS, thread_name_prefix="cnnmnist-grpc"),
        options=[
            ("grpc.max_receive_message_length", MAX_BODY),
            ("grpc.so_reuseport", 0),
        ],
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        _Predictions(handlers), server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(_Models(handlers), server)
    host = f"[{address.ip}]" if ":" in address.ip else address.ip
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if not bound:
        raise CnnmnistError(
            f"{address.given}:{port} (gRPC) is already in use or cannot be bound; choose "
            "another --grpc-port"
        )

    def start(loop: asyncio.AbstractEventLoop, metrics: observe.Metrics) -> Callable[[], None]:
        handlers.loop, handlers.metrics = loop, metrics
        server.start()
        return lambda: server.stop(grace=1.0)

    start.port = bound  # the port actually bound (0 picks a free one)
    return start
