"""`prmserve ui`: `prmserve serve`, and the page at / opened in a browser once the server listens."""

from __future__ import annotations

import argparse

from prmserve.cli.serve import add_serve_arguments, run_serve


def add_ui_arguments(parser: argparse.ArgumentParser) -> None:
    """`prmserve ui [MODEL]`: `prmserve serve`'s flags, and whether to open the page in a browser."""
    add_serve_arguments(parser)
    parser.add_argument("--no-browser", action="store_true", help="serve the page without opening a browser")


def run_ui(args: argparse.Namespace) -> int:
    """Serve as `prmserve serve` does; once the server listens (the model loads first), open its page at /."""
    import socket
    import threading
    import time
    import webbrowser

    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host  # a wildcard bind answers on loopback
    url = f"{'https' if args.ssl_certfile else 'http'}://{f'[{host}]' if ':' in host else host}:{args.port}/"

    def open_when_listening() -> None:
        while True:
            try:
                socket.create_connection((host, args.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        webbrowser.open(url)

    if not args.no_browser:
        threading.Thread(target=open_when_listening, daemon=True).start()
    return run_serve(args)
