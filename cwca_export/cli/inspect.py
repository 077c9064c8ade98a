"""``cwca-export inspect``: what is in a scores file, a plan file or a model folder."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cwca_export.cli.options import loading_options


def _describe_json(path: Path) -> dict:
    from cwca_export.loading import read_json_object

    data = read_json_object(path)
    kind = data.get("_type") if isinstance(data, dict) else None
    if kind == "LayerScores":
        from cwca_export.scores import LayerScores

        s = LayerScores.from_dict(data, source=str(path))
        return {
            "type": kind,
            "method": s.method,
            "blocks": s.num_blocks,
            "samples": s.samples,
            "tokens": s.tokens,
            "model": s.model,
            "zeta2": s.zeta2,
            "q": s.qualities().tolist(),
            "n_params": s.n_params,
        }
    if kind == "Plan":
        from cwca_export.plan import Plan

        p = Plan.from_dict(data, source=str(path))
        p.check_bounds(str(path))
        out = {"type": kind, "program": p.program, "blocks": p.num_blocks, "parameters": p.parameters}
        if p.program == "prune":
            out["global_sparsity"] = p.global_sparsity
        out["x"] = p.x
        out["model"] = p.model
        return out
    raise click.ClickException(
        f"{path}: not a scores or plan file (its _type is {kind!r}); pass scores.json, plan.json or a model folder"
    )


def _describe_model(path: Path, trust_remote_code: bool, allow_pickle: bool) -> dict:
    """Map blocks on an empty (meta-device) copy: the weights are checked, never read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from cwca_export.blocks import find_blocks
    from cwca_export.loading import check_model_folder

    check_model_folder(path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    blocks = find_blocks(model)
    return {
        "type": "model",
        "architecture": type(model).__name__,
        "blocks": len(blocks),
        "parameters": sum(p.numel() for p in model.parameters()),
        "block_params": [b.n_params for b in blocks],
        "linears": sorted({name.rsplit(".", 1)[-1] for name in blocks[0].linears}),
    }


@click.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@loading_options
def inspect(path: str, as_json: bool, trust_remote_code: bool, allow_pickle: bool) -> None:
    """Summarise a scores.json, a plan.json or a Hugging Face model folder.

    \b
    Examples:
      cwca-export inspect plan.json
      cwca-export inspect scores.json --json
      cwca-export inspect ./my-llama      # blocks and prunable weights, no weights loaded
    """
    target = Path(path)
    if target.is_dir():
        info = _describe_model(target, trust_remote_code, allow_pickle)
    else:
        info = _describe_json(target)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if isinstance(value, list) and value and isinstance(value[0], float):
            value = "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
        click.echo(f"{key:>16}: {value}")
