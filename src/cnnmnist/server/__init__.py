"""`cnnmnist serve`: the server, in parts.

    app        the HTTP application (Starlette): routes, bodies, the image endpoint
    guard      who may call it (Host and Origin checks, CORS when allowed)
    tfserving  TensorFlow Serving's REST JSON
    batcher    requests joined into model calls on the model's thread
    servables  the checkpoint served, and the versions of a base folder
    observe    Prometheus metrics and the access log
    grpc_api   TensorFlow Serving's gRPC API (an extra)
    servables  the checkpoint served, and the versions of a base folder
    observe    Prometheus metrics and the access log
    grpc_api   TensorFlow Serving's gRPC API (an extra)
    listen     the socket, Uvicorn, time-outs, and stopping on a signal
    static/    the draw-a-digit page

Its packages are an extra (pip install 'cnnmnist[serve]'): `require` says which are missing
before any of them is imported.
"""

from __future__ import annotations

import importlib.util

from cnnmnist.errors import CnnmnistError

# Module -> the package that provides it.
PACKAGES = {
    "uvicorn": "uvicorn",
    "starlette": "starlette",
    "multipart": "python-multipart",
    "orjson": "orjson",
    "httptools": "httptools",
}


# What the gRPC API needs besides them.
GRPC_PACKAGES = {"grpc": "grpcio", "tensorflow_serving": "tensorflow-serving-api"}


def require(grpc: bool = False) -> None:
    """Raise, naming the missing packages and how to get them, unless serve can run (with its
    gRPC API, if asked)."""
    for needed, extra in ((PACKAGES, "serve"), (GRPC_PACKAGES if grpc else {}, "grpc")):
        missing = [package for module, package in needed.items() if not _installed(module)]
        if missing:
            what = "serve" if extra == "serve" else "--grpc-port"
            raise CnnmnistError(
                f"{what} needs {' and '.join(missing)}: pip install 'cnnmnist[{extra}]'"
            )


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
