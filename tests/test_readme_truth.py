"""README.md and every verb's --help tell the truth: what they show exists and reads as meant."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cwca_export.cli import cli

VERBS = ("score", "plan", "refine", "compress", "export", "eval", "inspect", "demo", "report", "run")


@pytest.mark.parametrize("verb", VERBS)
def test_help_shows_no_placeholder_range(verb):
    # an unbounded number once read "[default: 2.0; x<=None]" (plan --beta)
    result = CliRunner().invoke(cli, [verb, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "None]" not in result.output and "<=None" not in result.output


def test_export_help_states_the_formats_default_the_search_uses(tmp_path):
    # export --help once promised int4-b128-asym; the shipped model (192-wide inputs) gets b64
    from helpers import tiny_model

    from cwca_export.planning.precision import default_formats

    model = tiny_model("llama", hidden_size=192, intermediate_size=512)
    assert default_formats(model)[2] == "int4-b64-asym"
    text = " ".join(CliRunner().invoke(cli, ["export", "--help"], terminal_width=400).output.split())
    assert "[default: fp32,int8,int4-b128-asym,int4-b32]" not in text
    assert "int4-bB-asym,int4-b32 with B the largest of 128, 64 dividing every input size, else 32" in text
    # and a latency limit on the CPU adds int8-compute twins (search_formats), which --help names too
    from cwca_export.budget import Budget
    from cwca_export.exporter.build import ExportSettings
    from cwca_export.exporter.search import search_formats

    names = search_formats(Budget(max_disk=2**20, max_latency_ms=5.0), ExportSettings(), model=model)
    assert "int4-b64-asym-a8" in names
    assert "with a latency limit on the CPU each int4 format also with int8 compute (-a8)" in text


def _readme_python_block() -> str:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return re.search(r"### Python\n\n```python\n(.*?)```", text, re.S).group(1)


def test_readme_python_example_uses_no_name_before_defining_it():
    # the example once called plan.check(model) before loading model and compressed with an
    # undefined calib; copied literally it stopped at a NameError
    import ast
    import builtins

    defined = set(dir(builtins))
    for stmt in ast.parse(_readme_python_block()).body:
        used = {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        assert used <= defined, f"line {stmt.lineno} uses {sorted(used - defined)} before defining it"
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                defined.update((a.asname or a.name).split(".")[0] for a in node.names)


def test_peft_refusal_hints_a_flag_that_helps_when_the_budget_is_slack(tmp_path):
    # equal qualities of 1/4 each: gamma q^2 / alpha = 0.1125 < 1, so no block earns a unit at any
    # budget; the refusal said "raise --budget", which changes nothing
    from helpers import save_tiny_model

    from cwca_export.scores import LayerScores

    model_dir = save_tiny_model("llama", tmp_path / "m", num_hidden_layers=4)
    scores = tmp_path / "scores.json"
    LayerScores("gradnorm", zeta2=[1.0] * 4, n_params=[10] * 4).save(scores)

    def plan(*extra):
        return CliRunner().invoke(cli, ["plan", str(scores), "--program", "allocate", "--model", str(model_dir),
                                        "--rank-step", "4", *extra], catch_exceptions=False)

    base = ["--peft-config", str(tmp_path / "lora"), "--out", str(tmp_path / "p.json")]
    for budget in ("96", "1000000"):
        r = plan("--budget", budget, *base)
        assert r.exit_code != 0 and "raise --budget" not in r.output and "--lo 1" in r.output, r.output
    r = plan("--budget", "96", "--lo", "1", *base)  # the hinted flag does give every block a unit
    assert r.exit_code == 0, r.output
    assert (tmp_path / "lora" / "adapter_config.json").exists()


def _readme_cli_commands() -> list[list[str]]:
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"### CLI\n\n```bash\n(.*?)```", text, re.S).group(1)
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if "cwca_export" in words:  # torchrun ... -m cwca_export VERB
            words = ["cwca-export", *words[words.index("cwca_export") + 1:]]
        if words and words[0] == "cwca-export":
            commands.append(words[1:])
        elif ">" in words:  # a shell step that writes a file, e.g. jq ... > formats.json
            commands.append(["(shell)", "--out", words[words.index(">") + 1]])
    return commands


def test_readme_cli_reads_only_files_an_earlier_command_wrote():
    # copied top to bottom, a command once read owl.json (and formats.json) that no command made,
    # an export wrote into artifact-q made above, and side plans
    # (the --psi log one, the OWL baseline, the llm-compressor recipe's) replaced the plan.json
    # that compress applies
    defaults = {"score": "scores.json", "plan": "plan.json", "refine": "plan.json"}
    written: set[str] = set()
    plan_json_writer = None
    for words in _readme_cli_commands():
        verb, args = words[0], words[1:]
        value = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
        reads = [value[f] for f in ("--scores", "--plan", "--precision", "--precision-damage") if f in value]
        if verb in ("plan", "inspect") and args and args[0].endswith(".json"):
            reads.append(args[0])
        for path in reads:
            assert path in written, f"`cwca-export {' '.join(words)}` reads {path}, which no command above writes"
        if verb == "compress" and value["--plan"] == "plan.json":
            assert plan_json_writer == "refine", f"compress applies the plan.json of `{plan_json_writer}`"
        out = value.get("--out", defaults.get(verb))
        if verb in ("compress", "export", "run", "demo") and "--overwrite" not in args and "--dry-run" not in args:
            assert out not in written, f"`cwca-export {' '.join(words)}`: {out} exists from a command above"
        if verb == "score" and value.get("--estimator") == "precision":
            out = value["--out"]
        if out:
            written.add(out)
            if out == "plan.json":
                plan_json_writer = verb


def test_export_help_says_what_prices_and_clips_without_data():
    # export --precision formats.json (no --data) clips with the shipped text; --help said nothing
    from helpers import tiny_tokenizer

    from cwca_export.exporter.search import calibration_ids

    _, source = calibration_ids(tiny_tokenizer(), {}, None, 384)
    assert source.startswith("shipped Python documentation text")
    text = " ".join(CliRunner().invoke(cli, ["export", "--help"], terminal_width=400).output.split())
    assert "[default for the pricing and clip: the shipped Python documentation text]" in text


def _help_examples(verb: str) -> list[list[str]]:
    import shlex

    text = CliRunner().invoke(cli, [verb, "--help"], terminal_width=400).output
    block = text.split("Examples:")[1].split("Options:")[0].replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in block.splitlines() if "cwca" in line]


def test_precision_damage_examples_price_on_the_calibration_the_table_was_measured_on():
    # export --help's --precision-damage example priced on export's default 32 x 256 while the
    # table of score --help's example is 32 x 128: export refuses such a table
    def calib(words):
        value = {a: words[i + 1] for i, a in enumerate(words[:-1]) if a.startswith("--")}
        return value.get("--samples", "32"), value.get("--seq-len", "256")

    tables = [calib(w) for w in _help_examples("score") if "precision" in w and "score" in w]
    uses = [calib(w) for verb in ("score", "export") for w in _help_examples(verb)
            if "export" in w and "--precision-damage" in w]
    assert tables and len(uses) >= 2
    assert all(use in tables for use in uses), (tables, uses)
