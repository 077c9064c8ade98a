"""``cwca-export run``: carry out a YAML recipe (score, plan, compress, export, eval)."""

from __future__ import annotations

import json

import click

from cwca_export.cli.guard import guards_output


@click.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: scores, plan, compressed model, artifact, report (written atomically).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder cwca-export wrote (atomically; never one holding other files).")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@guards_output(inputs={"recipe_path": "RECIPE"}, overwrite=None)  # run_recipe checks the rest (its model, data)
def run(recipe_path, out, overwrite, as_json) -> None:
    """Run RECIPE, a YAML file naming the model, data and every step (see recipes/README.md).

    \b
    Examples:
      cwca-export run recipes/examples/demo-wanda-50.yaml --out demo-run
      cwca-export run my-recipe.yaml --out build/llama-70 --overwrite
    """
    from cwca_export.recipe import Recipe, run_recipe

    recipe = Recipe.load(recipe_path)
    summary = run_recipe(recipe, out, overwrite=overwrite, echo=lambda m: click.echo(m, err=as_json))
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
