"""Count how the CLI meets bad input and faults: the numbers of BENCHMARKS.md's Reliability section.

Runs the bad-input catalogue (tests/bad_inputs.py: every verb, through the real CLI in this
process) and the fault-injection scenarios (tests/faults.py: exceptions inside each stage and
a disk that fills up, over a previous output), the same cases the tests assert, and reports:
cases tried, clear errors (one ``Error:`` line naming the file or flag with a ``--flag`` hint,
no traceback, nothing left behind, no folder code run), faults survived (completed correctly,
or the previous output byte-identical) and files lost.

Usage:
    python benchmarks/bench_reliability.py [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    args = parser.parse_args()

    from bad_inputs import CASES, build_world, run_in_process
    from click.testing import CliRunner
    from faults import SCENARIOS, VERBS, prepare_previous, run_scenario

    from cwca_export.cli import cli

    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = build_world(root / "world")
        outcomes = [run_in_process(world, case) for case in CASES]
        result = CliRunner().invoke(cli, ["run", str(world.root / "recipe-good.yaml"), "--out",
                                          str(world.root / "report-source")])
        assert result.exit_code == 0, result.output
        needed = {s.verb for s in SCENARIOS}
        references = {}
        for name in sorted(needed):
            (root / f"ref-{name}").mkdir()
            references[name] = prepare_previous(world.root, root / f"ref-{name}", VERBS[name])
        faults = []
        for i, scenario in enumerate(SCENARIOS):
            work = root / f"fault-{i}"
            work.mkdir()
            faults.append(run_scenario(world.root, work, references[scenario.verb], scenario))
    verbs = sorted({c.argv[0] for c in CASES} & set(cli.commands))
    counts = {
        "cases_tried": len(outcomes),
        "verbs": verbs,
        "clear_errors": sum(o.clear for o in outcomes),
        "unclear": {o.case.id: list(o.problems) for o in outcomes if not o.clear},
        "faults_tried": len(faults),
        "faults_fired": sum(f.fired for f in faults),
        "faults_survived": sum(f.survived for f in faults),
        "faults_completed": sum(f.exit_code == 0 for f in faults),
        "not_survived": {f.scenario.id: list(f.problems) for f in faults if not f.survived},
        "files_lost": sum(f.files_lost for f in faults),
        "wall_time_s": round(time.perf_counter() - began, 1),
    }
    if args.json:
        print(json.dumps(counts, indent=2))
        return
    print(f"bad inputs: {counts['clear_errors']} clear errors of {counts['cases_tried']} cases"
          f" over {len(verbs)} verbs ({', '.join(verbs)})")
    for case_id, problems in counts["unclear"].items():
        print(f"  unclear: {case_id}: {'; '.join(problems)}")
    print(f"faults: {counts['faults_survived']} survived of {counts['faults_tried']} injected"
          f" ({counts['faults_fired']} fired, {counts['faults_completed']} runs completed anyway);"
          f" files lost: {counts['files_lost']}")
    for scenario_id, problems in counts["not_survived"].items():
        print(f"  not survived: {scenario_id}: {'; '.join(problems)}")
    print(f"in {counts['wall_time_s']} s")


if __name__ == "__main__":
    main()
