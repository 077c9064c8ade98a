"""Planning: turn per-block scores or measured damage curves into a per-block plan.

The stage between scoring and compression (docs/design.md 1.1). Modules:

- `solver`: the two closed-form programs (pruning and allocation) on zeta2 scores.
- `curve_solver`: the same programs on measured, monotone damage curves.
- `damage`: measures the damage curves (loss or KL of one block compressed alone).
- `plan`: the `Plan` file format and the rules that make one (prune, allocate, damage, band).
- `rank_plans`: low-rank plans (kept-rank fractions) from damage curves.
- `refine`: refinement of a plan against whole-model losses.
- `plan_probe`: measures a whole plan's loss on the model for refinement.
- `plan_scaling`: re-solves a plan at a new global target with the rule that made it.
- `precision`: per-block precision (bit-width) plans for the export search.
"""
