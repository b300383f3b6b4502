"""`anomap serve`: an HTTP API and a web page for a saved model (FastAPI + uvicorn, the `serve` extra).

`prepare(model, ...)` loads the model and binds the address; `.run()` serves until SIGINT/SIGTERM.
`create_app(ServedModel(path), ...)` gives the bare ASGI application.
"""

from ..errors import AnomapError

try:
    import fastapi  # noqa: F401
    import python_multipart  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the installation
    raise AnomapError(
        f"anomap serve needs the 'serve' extra ({err.name} is missing): pip install 'anomap[serve]'"
    ) from err

from .app import create_app
from .model import ServedModel
from .server import Serving, exposure_warning, prepare, read_token

__all__ = ["ServedModel", "Serving", "create_app", "exposure_warning", "prepare", "read_token"]
