"""`lnscope serve`: run the API server with uvicorn."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="start the web server (API under /api/v1)")
    p.add_argument("--host", help="bind address (default 127.0.0.1; $LNSCOPE_HOST)")
    p.add_argument("--port", type=int, help="port (default 8000; $LNSCOPE_PORT)")
    p.add_argument("--pair", help="pair to load at start-up (default: the configured default pair)")
    p.add_argument("--device", help="cuda, mps or cpu (default: $LNSCOPE_DEVICE or the best available)")
    p.add_argument("--dtype", help="float32 (default), float64, bfloat16, float16")
    p.add_argument("--no-preload", action="store_true", help="load models on first use only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from lnscope.server.app import create_app
    from lnscope.server.settings import Settings

    settings = Settings.from_env(
        host=args.host, port=args.port, pair=args.pair, device=args.device, dtype=args.dtype,
        preload=False if args.no_preload else None,
    )
    app = create_app(settings)  # validates the pair, device and dtype before binding
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    return 0
