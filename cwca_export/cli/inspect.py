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
        from cwca_export.planning.plan import Plan

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
    """Map blocks on an empty (meta-device) copy: the weights are checked, never read.

    A compressed folder's config records each block's narrowed widths and factorised
    Linears (``cwca_compression``); the empty copy is given those shapes first, so the
    counts are the folder's, not the dense model's it came from.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from cwca_export.blocks import find_blocks
    from cwca_export.compression.saving import COMPRESSION_KEY, apply_structure
    from cwca_export.loading import check_model_folder

    check_model_folder(path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    record = getattr(config, COMPRESSION_KEY, None)
    if isinstance(record, dict):
        apply_structure(model, record["blocks"])
    blocks = find_blocks(model)
    info = {
        "type": "model",
        "architecture": type(model).__name__,
        "blocks": len(blocks),
        "parameters": sum(p.numel() for p in model.parameters()),
        "block_params": [b.n_params for b in blocks],
        "linears": sorted({name.rsplit(".", 1)[-1] for name in blocks[0].linears}),
    }
    if isinstance(record, dict):
        info["compression"] = [step.get("method") for step in record.get("steps", [])]
    return info


def _verify(folder: Path, as_json: bool) -> None:
    """One line per file missing, changed or added against the folder's record; exit 1 if any."""
    from cwca_export.outputs import read_record, verify_folder

    if not folder.is_dir():
        raise click.UsageError(f"--verify checks a folder written by cwca-export; {folder} is a file")
    record, rows = read_record(folder)
    problems = verify_folder(folder)
    if as_json:
        click.echo(json.dumps({"folder": str(folder), "record": record.name, "files": len(rows), "problems": problems},
                              indent=2))
    else:
        for line in problems:
            click.echo(line)
        if not problems:
            click.echo(f"ok: {len(rows)} files match {record.name}")
    if problems:
        click.get_current_context().exit(1)


@click.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--verify", is_flag=True,
              help="Check a folder cwca-export wrote against its record of sha256 hashes; exit 1 on any difference.")
@loading_options
def inspect(path: str, as_json: bool, verify: bool, trust_remote_code: bool, allow_pickle: bool) -> None:
    """Summarise a scores.json, a plan.json or a Hugging Face model folder, or verify an output folder.

    \b
    Examples:
      cwca-export inspect plan.json
      cwca-export inspect scores.json --json
      cwca-export inspect ./my-llama      # blocks and prunable weights, no weights loaded
      cwca-export inspect ./narrow        # a compressed folder: its narrowed / factorised shapes
      cwca-export inspect --verify ./artifact   # every file still as the tool wrote it?
    """
    target = Path(path)
    if verify:
        _verify(target, as_json)
        return
    from cwca_export.interrupts import HEAVY_IMPORTS, import_whole

    # what follows imports torch (and, for a model folder, transformers): whole, signals held (a SIGTERM
    # 0.34 s into inspecting a model folder broke NumPy half-way: RecursionError, exit 1)
    import_whole(*(HEAVY_IMPORTS if target.is_dir() else HEAVY_IMPORTS[:1]))
    info = _describe_model(target, trust_remote_code, allow_pickle) if target.is_dir() else _describe_json(target)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if isinstance(value, list) and value and isinstance(value[0], float):
            value = "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
        click.echo(f"{key:>16}: {value}")
