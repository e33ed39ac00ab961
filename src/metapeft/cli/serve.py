"""Serve adapters over local HTTP (``metapeft.serve``):

    metapeft serve [NAME=]ADAPTER... [--host 127.0.0.1] [--port 8005] [--model M]
"""

from __future__ import annotations

from typing import List, Optional

import typer

from metapeft.cli._common import DEQUANTIZE_OPT, Dequantize, err_console, user_errors
from metapeft.cli.predict import ADAPTER_MODEL_OPT

# the defaults are metapeft.serve's, spelled out so that --help does not import it
DEFAULT_HOST, DEFAULT_PORT, MAX_BODY_BYTES, MAX_TEXTS = "127.0.0.1", 8005, 1 << 20, 256


def serve(
    adapters: List[str] = typer.Argument(..., metavar="[NAME=]ADAPTER", help="Adapter "
                                         "directories written by `metapeft adapt --out`, all on "
                                         "one base model; each is named by its basename, or "
                                         "NAME=DIR."),
    host: str = typer.Option(DEFAULT_HOST, "--host", help="Address to listen on (loopback by "
                             "default; there is no authentication)."),
    port: int = typer.Option(DEFAULT_PORT, "--port", help="Port (0: any free one)."),
    model: Optional[str] = ADAPTER_MODEL_OPT,
    dequantize: Dequantize = DEQUANTIZE_OPT,
    max_body_bytes: int = typer.Option(MAX_BODY_BYTES, "--max-body-bytes", help="Largest "
                                       "request body accepted (413 above)."),
    max_texts: int = typer.Option(MAX_TEXTS, "--max-texts", help="Most texts in one request "
                                  "(413 above)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not log each request on "
                               "stderr."),
):
    """Serve adapters as a local HTTP JSON service: POST /v1/classify {"adapter", "texts",
    "top_k"} answers as `predict` does; GET /v1/adapters, GET /health. Stops on Ctrl-C or
    SIGTERM; writes nothing to disk."""
    with user_errors():
        from metapeft.serve import Limits, is_loopback
        from metapeft.serve import serve as run

        def ready(server) -> None:
            from rich.markup import escape

            pool = server.pool
            err_console.print(escape(f"serving {len(pool.names)} adapter(s) ("
                                     f"{', '.join(pool.names)}) on {pool.model_id} at "
                                     f"{server.url}") + " (POST /v1/classify, GET "
                              "/v1/adapters, GET /health); Ctrl-C stops", highlight=False,
                              soft_wrap=True)
            if not is_loopback(host):
                err_console.print(f"[yellow]note:[/yellow] {escape(host)} is reachable from "
                                  "other machines, and the service has no authentication",
                                  highlight=False, soft_wrap=True)

        run(adapters, model=model, dequantize=dequantize.value, host=host, port=port,
            limits=Limits(max_body_bytes=max_body_bytes, max_texts=max_texts), quiet=quiet,
            on_ready=ready)
        err_console.print("stopped")


def register(app: typer.Typer) -> None:
    app.command()(serve)
