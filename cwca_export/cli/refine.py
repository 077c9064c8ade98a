"""``cwca-export refine``: a pruning plan corrected on measured whole-plan calibration losses."""

from __future__ import annotations

import click

from cwca_export.cli.guard import guards_output
from cwca_export.cli.options import COUNT, METHOD, SIZE, finite, loading_options
from cwca_export.defaults import REFINE_SAMPLES, REFINE_SEQ_LEN

# the methods whose whole-plan loss refine can measure
_REFINABLE = ("magnitude", "wanda", "sparsegpt", "lowrank", "asvd")


@click.command()
@click.argument("model_dir", metavar="MODEL_DIR", type=click.Path(exists=True, file_okay=False))
@click.option("--scores", "scores_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="scores.json of MODEL_DIR; measured damage (score --estimator damage) recommended.")
@click.option("--sparsity", type=finite(0, 1, max_open=True), default=None,
              help="Pruning plans: global sparsity, a fraction of all block weights.")
@click.option("--budget-fraction", type=finite(0, 1, min_open=True), default=None,
              help="Rank plans (--method lowrank|asvd): fraction of the blocks' Linear weights kept.")
@click.option("--rank-step", type=COUNT, default=8, show_default=True, help="Rank plans: rank of one plan unit.")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True),
              help="Calibration text (.txt, .jsonl, or a folder saved by datasets' save_to_disk: one split, column"
                   " --text-field, needs pip install 'cwca-export[datasets]'), the same kind the scores used.")
@click.option("--text-field", default="text", show_default=True,
              help="JSON Lines field (or dataset column) holding the text.")
@click.option("--method", type=METHOD, default="wanda", show_default=True,
              help=f"The method the plan will be applied with ({', '.join(_REFINABLE)}); its loss is measured.")
@click.option("--samples", type=COUNT, default=REFINE_SAMPLES, show_default=True,
              help="Calibration sequences (fewer than score's: every measurement is a forward over them).")
@click.option("--seq-len", type=click.IntRange(min=2), default=REFINE_SEQ_LEN, show_default=True,
              help="Tokens per sequence.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the choice of sequences.")
@click.option("--max-evals", type=COUNT, default=40, show_default=True,
              help="Whole-plan forwards for tuning and refinement together.")
@click.option("--tune/--no-tune", default=True, show_default=True,
              help="Choose the start (rule, kappa, band) by calibration loss among a small grid and uniform.")
@click.option("--band", type=finite(0), default=None, help="Keep every block within [S - BAND, S + BAND].")
@click.option("--lo", type=finite(0), default=0.0, show_default=True, help="Lower bound for every block.")
@click.option("--hi", type=finite(0), default=0.95, show_default=True, help="Upper bound for every block.")
@click.option("--probe-cache", type=SIZE, metavar="SIZE", default=None,
              help="Pruning plans: memory for pruned block copies kept between measured plans"
                   " (least recently used evicted and recomputed; same plan), e.g. 512MiB [default: 2GiB].")
@click.option("--batch-size", type=COUNT, default=8, show_default=True,
              help="Sequences per forward; under torchrun the batches are dealt to the processes in turn.")
@click.option("--device", default="cpu", show_default=True,
              help="Where the measured forwards run, e.g. cuda (under torchrun: each process its own GPU).")
@click.option("--out", type=click.Path(dir_okay=False), default="plan.json", show_default=True,
              help="Where to write the plan (atomically; under torchrun only the main process writes). An existing"
                   " file is replaced only when it is a plan the tool wrote, unedited (its content stamp).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (as written to --out).")
@loading_options
@guards_output(inputs={"model_dir": "MODEL_DIR", "scores_path": "--scores", "data_path": "--data"},
               kind="file", json_types={"Plan"}, overwrite=None)
def refine(model_dir, scores_path, sparsity, budget_fraction, rank_step, data_path, text_field, method, samples,
           seq_len, seed, max_evals, tune, band, lo, hi, probe_cache, batch_size, device, out, as_json,
           trust_remote_code, allow_pickle) -> None:
    """Plan SPARSITY for MODEL_DIR: closed form first, then exchanges kept only when the loss drops.

    Damage is not additive across blocks, so the separable one-dual plan skews too much; this
    measures whole plans (one forward over the calibration set each, at most --max-evals) and
    keeps a move between two blocks only when the measured calibration loss falls. Under
    torchrun / accelerate launch the forwards are split across the processes (same plan).

    \b
    Examples:
      cwca-export score ./llama --data calib.txt --estimator damage --option pruner=wanda --out damage.json
      cwca-export refine ./llama --scores damage.json --sparsity 0.7 --data calib.txt --method wanda
      cwca-export compress ./llama --plan plan.json --method wanda --data calib.txt --out llama-70
      cwca-export refine ./llama --scores lr.json --budget-fraction 0.6 --data calib.txt --method asvd
      torchrun --nproc_per_node 2 -m cwca_export refine ./llama --scores damage.json --sparsity 0.7 --data calib.txt
    """
    import torch

    from cwca_export.blocks import model_fingerprint
    from cwca_export.data import calibration_data
    from cwca_export.data_parallel import check_batches, joined_processes, launched_processes
    from cwca_export.loading import check_model_folder, load_model
    from cwca_export.planning.refine import refine_plan, refine_ranks
    from cwca_export.scores import LayerScores

    if method not in _REFINABLE:
        raise click.BadParameter(f"refine measures {', '.join(_REFINABLE)}, not {method!r}", param_hint="--method")
    ranks = method in ("lowrank", "asvd")
    if ranks and (budget_fraction is None or sparsity is not None):
        raise click.UsageError(f"--method {method} plans ranks: give --budget-fraction (not --sparsity)")
    if not ranks and (sparsity is None or budget_fraction is not None):
        raise click.UsageError(f"--method {method} prunes: give --sparsity (not --budget-fraction)")
    if ranks and band is not None:
        raise click.UsageError("--band applies to pruning plans; bound rank plans with --lo / --hi")
    if ranks and probe_cache is not None:
        raise click.UsageError("--probe-cache bounds pruned block copies; rank plans cache their factors once")
    check_batches(samples, batch_size, launched_processes())  # before any process waits on another
    scores = LayerScores.load(scores_path)
    check_model_folder(model_dir, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                       lengths={"--seq-len": seq_len})
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise click.BadParameter(f"{device!r}: not a torch device; pass --device cpu or --device cuda",
                                 param_hint="--device") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("no CUDA device is visible here; pass --device cpu", param_hint="--device")
    model, tokenizer = load_model(model_dir, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    model.eval()
    calib = calibration_data(data_path, tokenizer, num_samples=samples, seq_len=seq_len, seed=seed,
                             text_field=text_field)
    with joined_processes() as processes:
        processes.require_same({"--data": calib.data_hash, "model (MODEL_DIR)": model_fingerprint(model)})
        model.to(processes.device(kind) if processes.world > 1 and kind == "cuda" else torch.device(device))
        show = not as_json and processes.is_main
        if ranks:
            plan = refine_ranks(model, scores, budget_fraction, calib, method=method, rank_step=rank_step,
                                max_evals=max_evals, tune=tune, lo=lo, hi=hi, batch_size=batch_size,
                                progress=show, processes=processes)
        else:
            plan = refine_plan(model, scores, sparsity, calib, method=method, tune=tune, max_evals=max_evals,
                               lo=lo, hi=hi, band=band, batch_size=batch_size, progress=show,
                               probe_cache=probe_cache, processes=processes)
    if not processes.is_main:  # every process holds the same plan; one writes
        return
    plan.check(model)
    path = plan.save(out)
    if as_json:
        import json

        click.echo(json.dumps(json.loads(path.read_text(encoding="utf-8")), indent=2))
        return
    r = plan.parameters["refinement"]
    click.echo(" ".join(f"{x:g}" if ranks else f"{x:.3f}" for x in plan.x))
    click.echo(
        f"start {r['start']}; calibration loss {r['calib_loss_start']:.4f} -> {r['calib_loss']:.4f}"
        f" (dense {r['dense_loss']:.4f}); {len(r['moves'])} moves kept; {r['forwards']} forwards"
        f" in {r['wall_time_s']:.1f} s; wrote {path}"
    )
