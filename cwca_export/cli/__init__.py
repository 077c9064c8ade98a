"""The ``cwca-export`` command line: thin verbs over the Python API.

Each verb lives in its own module and imports heavy libraries inside its body, so
``cwca-export --help`` stays instant.
"""

from __future__ import annotations

import os
import sys

import click

from cwca_export import __version__

_EXPECTED = (ValueError, OSError, KeyError, ImportError)


class _Group(click.Group):
    """Turns the library's errors into one ``Error: ...`` line and exit code 1, and an interrupt
    into exit code 130 (SIGINT) or 143 (SIGTERM)."""

    def invoke(self, ctx: click.Context):
        from cwca_export.interrupts import Terminated, exit_code

        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except (KeyboardInterrupt, Terminated) as exc:  # everything on the way out has cleaned up
            if os.environ.get("CWCA_DEBUG"):
                raise
            signal_name = "SIGINT" if isinstance(exc, KeyboardInterrupt) else "SIGTERM"
            click.echo(f"Interrupted ({signal_name}): stopped; no partial output was left", err=True)
            ctx.exit(exit_code(exc))
        except _EXPECTED as exc:
            if os.environ.get("CWCA_DEBUG"):
                raise
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise click.ClickException(message) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cwca-export")
def cli() -> None:
    """Score, plan, compress and export Hugging Face causal LMs under a hardware budget.

    \b
    Examples:
      cwca-export demo                                   # the whole pipeline on the shipped model
      cwca-export score ./my-llama --data calib.txt --out scores.json
      cwca-export plan scores.json --program prune --sparsity 0.5 --bounds 0:0.3 --out plan.json
      cwca-export compress ./my-llama --plan plan.json --method width --data calib.txt --out small
      cwca-export export small --out artifact --quantize int8 --max-memory 1.5GiB
      cwca-export eval artifact --data heldout.txt
      cwca-export report cwca-demo                       # layers.png and report.html

    Set CWCA_DEBUG=1 to see tracebacks instead of one-line errors.
    """


def _register() -> None:
    from cwca_export.cli import compress, demo, eval, export, inspect, plan, refine, report, run, score

    cli.add_command(score.score)
    cli.add_command(plan.plan)
    cli.add_command(refine.refine)
    cli.add_command(compress.compress)
    cli.add_command(inspect.inspect)
    cli.add_command(export.export)
    cli.add_command(eval.eval_command)
    cli.add_command(demo.demo)
    cli.add_command(report.report)
    cli.add_command(run.run)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    from cwca_export.interrupts import install_handlers

    install_handlers()
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="cwca-export")
