"""`python -m cwca_export` runs the CLI.

Signals are handled from here on, before the verbs import: a SIGINT / SIGTERM while they do
exits 130 / 143 with one line, as later ones do (a SIGINT there printed a traceback and the
process died of it, -2; a SIGTERM killed it, -15).
"""

import os

from cwca_export.interrupts import Terminated, exit_interrupted, install_handlers

install_handlers()
try:
    from cwca_export.cli import main
except (KeyboardInterrupt, Terminated) as exc:
    if os.environ.get("CWCA_DEBUG"):
        raise
    exit_interrupted(exc)

main()
