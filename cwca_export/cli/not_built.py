"""Verbs of the design that this version does not implement yet: they say so and exit 2."""

from __future__ import annotations

import click

_STATUS = {
    "run": "YAML recipes running score -> plan -> compress -> export",
}


def _make(name: str, what: str) -> click.Command:
    @click.command(
        name=name,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        help=f"Not built yet: {what}.",
        add_help_option=True,
    )
    @click.pass_context
    def command(ctx: click.Context) -> None:
        click.echo(
            f"cwca-export {name}: not built yet in this version ({what});"
            " see README 'Status'. Nothing was written.",
            err=True,
        )
        ctx.exit(2)

    return command


COMMANDS = [_make(name, what) for name, what in _STATUS.items()]
