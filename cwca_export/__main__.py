"""The command's entry point, both ``python -m cwca_export`` and the ``cwca-export`` console script.

Signals are handled from here on, before the verbs import: a SIGINT / SIGTERM while they do
exits 130 / 143 with one line, as later ones do (a SIGINT there printed a traceback and the
process died of it, -2; a SIGTERM killed it, -15). The console script pointed at
``cwca_export.cli:main`` had that window for as long as the verbs took to import (about 65 ms).
"""

import os


def main() -> None:
    """Install the signal handlers, then import and run the CLI."""
    from cwca_export.interrupts import Terminated, exit_interrupted, install_handlers

    install_handlers()
    try:
        from cwca_export.cli import main as run_cli
    except (KeyboardInterrupt, Terminated) as exc:
        if os.environ.get("CWCA_DEBUG"):
            raise
        exit_interrupted(exc)
    run_cli()


if __name__ == "__main__":
    main()
