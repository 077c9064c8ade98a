"""The ``cwca-export`` command line: thin verbs over the Python API.

Each verb lives in its own module and imports heavy libraries inside its body, so
``cwca-export --help`` stays instant.
"""

from __future__ import annotations

import errno
import functools
import os
import sys

import click

from cwca_export import __version__

# the library's own refusals: their message is the one line
_REFUSALS = (ValueError, OSError, KeyError, ImportError)


def one_line(message: str, command_path: str) -> str:
    """The first line of ``message``, with a pointer to the verb's --help when it names no flag."""
    command_path = " ".join(["cwca-export", *command_path.split()[1:]])  # click's prog name varies
    text = " ".join(message.strip().splitlines()[0].split()) if message.strip() else "failed"
    if "--" not in text:
        text = f"{text.rstrip('.')}; see `{command_path} --help`"
    return text


# verbs whose work imports torch and transformers: those imports are made whole first, signals held
# (interrupts.import_whole, interrupts.HEAVY_IMPORTS)
TORCH_VERBS = frozenset({"score", "refine", "compress", "export", "eval", "demo", "run"})


class _Group(click.Group):
    """Turns every error into one ``Error: ...`` line on stderr and a non-zero exit.

    Usage errors (a bad or missing flag) keep click's exit code 2; library errors exit 1. An
    exception class the library did not expect still prints one line (its type and message);
    ``CWCA_DEBUG=1`` shows the traceback instead. An interrupt exits 130 (SIGINT) or 143 (SIGTERM).
    """

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        """Register a verb with ``--verbose`` / ``--quiet`` (:mod:`cwca_export.cli.verbosity`)."""
        from cwca_export.cli.verbosity import verbosity, verbosity_options

        if cmd.callback is not None and not any(p.name == "verbose" for p in cmd.params):
            cmd.params.extend(verbosity_options())
            inner = cmd.callback

            @functools.wraps(inner)
            def callback(*args, verbose: bool = False, quiet: bool = False, **params):
                with verbosity(verbose=verbose, quiet=quiet, machine_output=bool(params.get("as_json"))):
                    return inner(*args, **params)

            cmd.callback = callback
        super().add_command(cmd, name)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        """The verb; for a torch verb, torch and transformers imported whole first, signals held:
        its options convert next, and a registry flag (``--method``) imports them (0.3 s into a
        compress, a SIGTERM there ended in "Could not import module 'GenerationMixin'", exit 1)."""
        name, cmd, rest = super().resolve_command(ctx, args)
        if cmd is not None and cmd.name in TORCH_VERBS and not {"--help", "-h"} & set(rest):
            from cwca_export.interrupts import HEAVY_IMPORTS, import_whole

            import_whole(*HEAVY_IMPORTS)
        return name, cmd, rest

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _usage(exc) from None

    def invoke(self, ctx: click.Context):
        from cwca_export.interrupts import Terminated, interrupt_cause

        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except (KeyboardInterrupt, Terminated) as exc:  # everything on the way out has cleaned up
            _interrupted(ctx, exc)
        except click.UsageError as exc:
            raise _usage(exc) from None
        except click.ClickException as exc:
            path = exc.ctx.command_path if getattr(exc, "ctx", None) else _verb(ctx)
            raise click.ClickException(one_line(exc.format_message(), path)) from None
        except Exception as exc:
            signalled = interrupt_cause(exc)  # an error raised while unwinding from an interrupt
            if signalled is not None:
                _interrupted(ctx, signalled)
            if os.environ.get("CWCA_DEBUG"):
                raise
            message = str(exc)
            if isinstance(exc, OSError) and exc.errno in _FULL:
                where = f" writing {exc.filename}" if exc.filename else ""
                message = (
                    f"{_FULL[exc.errno]}{where}; outputs are swapped in only when"
                    " complete, so a previous one is intact; hint: free space or pass --out on"
                    " another disk" + (" (or raise ulimit -f)" if exc.errno == errno.EFBIG else "")
                )
            elif isinstance(exc, MemoryError):
                message = (
                    "out of memory (MemoryError); hint: lower --batch-size, --samples or --seq-len"
                )
            elif not isinstance(exc, _REFUSALS) or not message.strip():
                # not one of the library's own refusals: say what broke and how to see more
                first = message.strip().splitlines()[0] if message.strip() else ""
                message = f"{type(exc).__name__}: {first} (set CWCA_DEBUG=1 for the traceback)"
            elif isinstance(exc, KeyError) and exc.args:
                message = f"missing key {exc.args[0]!r}"
            raise click.ClickException(one_line(message, _verb(ctx))) from None


# a write that cannot grow: the disk, the user's quota, the file system's or the process's size limit
_FULL = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (the file system's or the process's file size limit, ulimit -f)",
}


def _interrupted(ctx: click.Context, exc: BaseException) -> None:
    """Exit as the signal asks (130 / 143), one line on stderr (``CWCA_DEBUG=1``: the traceback of
    where it landed first; re-raised, click would turn a KeyboardInterrupt into "Aborted!", exit 1)."""
    from cwca_export.interrupts import exit_code

    if os.environ.get("CWCA_DEBUG"):
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    signal_name = "SIGINT" if isinstance(exc, KeyboardInterrupt) else "SIGTERM"
    click.echo(f"Interrupted ({signal_name}): stopped; no partial output was left", err=True)
    ctx.exit(exit_code(exc))


def _verb(ctx: click.Context) -> str:
    if ctx.invoked_subcommand:
        return f"{ctx.command_path} {ctx.invoked_subcommand}"
    return ctx.command_path


def _usage(exc: click.UsageError) -> click.ClickException:
    """click prints a usage error as usage, try-line and error: keep only the error, one line."""
    path = exc.ctx.command_path if exc.ctx is not None else "cwca-export"
    error = click.ClickException(one_line(exc.format_message(), path))
    error.exit_code = exc.exit_code
    return error


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
    from cwca_export.interrupts import Terminated, exit_interrupted, install_handlers, settle_interrupted_exit

    install_handlers()
    try:
        cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="cwca-export")
    except SystemExit:
        # the run is over, its outputs whole or absent, its status decided (130 / 143 for an interrupt
        # cleaned up and reported): a late signal (atexit, interpreter shutdown, which restores the
        # default action: a report signalled as it finished died -15) must not replace that status
        settle_interrupted_exit()
        raise
    except (KeyboardInterrupt, Terminated) as exc:  # one that escaped click's handling (seen once in CI)
        if os.environ.get("CWCA_DEBUG"):
            raise
        exit_interrupted(exc)
