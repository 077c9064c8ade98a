"""compress(): plans applied to tiny models of every family, against by-hand references.

The references are built independently: a deep copy of the dense model is edited block by
block with NumPy (masks, zeroed channels, truncated SVDs), each block's inputs captured from
the already-edited copy, the way the layer-by-layer pipeline defines them. The compressed
model's logits must equal the reference's.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from compress_plans import make_plan
from helpers import sample_text, tiny_model, tiny_tokenizer

import cwca_export
from cwca_export.blocks import find_blocks, weight_out_in
from cwca_export.data import calibration_data
from cwca_export.planning.plan import PlanMismatchError

RHO = [0.3, 0.6]


@pytest.fixture(scope="module")
def data():
    return calibration_data([sample_text()], tiny_tokenizer(), num_samples=8, seq_len=32)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _capture(model, ids, block):
    """Inputs (tokens, in) of each of the block's Linears when ``model`` runs on ``ids``."""
    seen: dict[str, list[np.ndarray]] = {}

    def tap(rel):
        def hook(_module, inputs, _output):
            a = inputs[0].detach()
            seen.setdefault(rel, []).append(a.reshape(-1, a.shape[-1]).double().numpy())

        return hook

    hooks = [
        lin.register_forward_hook(tap(path[len(block.name) + 1 :]))
        for path, lin in block.linears.items()
    ]
    _logits(model, ids)
    for h in hooks:
        h.remove()
    return {rel: np.concatenate(chunks) for rel, chunks in seen.items()}


def _reference(model, ids, edit):
    """A copy of ``model`` with ``edit(block, weights, inputs)`` applied block after block."""
    ref = copy.deepcopy(model)
    for block in find_blocks(ref):
        inputs = _capture(ref, ids, block)
        weights = {
            path[len(block.name) + 1 :]: weight_out_in(lin) for path, lin in block.linears.items()
        }
        with torch.no_grad():
            edit(block, weights, inputs)
    return ref


def _set(w: torch.Tensor, value: np.ndarray) -> None:
    w.copy_(torch.from_numpy(value).to(w.dtype))


# ---------------------------------------------------------------- by-hand edits


def _magnitude_edit(rho):
    def edit(block, weights, _inputs):
        for w in weights.values():
            a = w.double().numpy().copy()
            flat = a.reshape(-1)
            flat[np.argsort(np.abs(flat), kind="stable")[: round(rho[block.index] * flat.size)]] = 0
            _set(w, a)

    return edit


def _wanda_edit(rho):
    def edit(block, weights, inputs):
        for rel, w in weights.items():
            a = w.double().numpy().copy()
            metric = np.abs(a) * np.linalg.norm(inputs[rel], axis=0)[None, :]
            k = round(rho[block.index] * a.shape[1])
            for row in range(a.shape[0]):
                a[row, np.argsort(metric[row])[:k]] = 0
            _set(w, a)

    return edit


def _width_edit(rho, down, o=None, head_dim=None, per_group=1):
    from cwca_export.compression.width import kept_groups, kept_width

    def edit(block, weights, inputs):
        w = weights[down]
        a = w.double().numpy().copy()
        importance = np.linalg.norm(a, axis=0) * np.linalg.norm(inputs[down], axis=0)
        kept = kept_width(a.shape[1], rho[block.index])
        a[:, np.argsort(importance)[: a.shape[1] - kept]] = (
            0  # a dropped channel contributes nothing
        )
        _set(w, a)
        if o is not None:
            wo = weights[o]
            b = wo.double().numpy().copy()
            cols = np.linalg.norm(b, axis=0) * np.linalg.norm(inputs[o], axis=0)
            groups = cols.reshape(-1, per_group * head_dim).sum(axis=1)
            drop = np.argsort(groups)[: len(groups) - kept_groups(len(groups), rho[block.index])]
            for g in drop:
                b[:, g * per_group * head_dim : (g + 1) * per_group * head_dim] = 0
            _set(wo, b)

    return edit


def _svd_edit(units, step, whitened):
    def edit(block, weights, inputs):
        r = int(units[block.index]) * step
        for rel, w in weights.items():
            a = w.double().numpy()
            m, n = a.shape
            if r * (m + n) >= m * n:
                continue
            if whitened:  # the rank-r W' minimising ||(W - W') X^T||: project onto W X^T's top-r
                u = np.linalg.svd(a @ inputs[rel].T, full_matrices=False)[0][:, :r]
                _set(w, u @ u.T @ a)
            else:
                u, s, vh = np.linalg.svd(a, full_matrices=False)
                _set(w, (u[:, :r] * s[:r]) @ vh[:r])

    return edit


# ---------------------------------------------------------------- against the references


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("sequential", [True, False])
def test_magnitude_and_wanda_equal_masks_applied_by_hand(family, sequential, data):
    ids = data.input_ids
    for method, edit in (("magnitude", _magnitude_edit(RHO)), ("wanda", _wanda_edit(RHO))):
        dense = tiny_model(family)
        model = cwca_export.compress(
            copy.deepcopy(dense),
            make_plan(dense, "prune", RHO),
            method=method,
            data=data,
            sequential=sequential,
        )
        if sequential:
            ref = _reference(dense, ids, edit)
        else:  # every block's statistics from the dense model
            inputs = {b.index: _capture(dense, ids, b) for b in find_blocks(dense)}
            ref = copy.deepcopy(dense)
            for block in find_blocks(ref):
                weights = {
                    p[len(block.name) + 1 :]: weight_out_in(m) for p, m in block.linears.items()
                }
                with torch.no_grad():
                    edit(block, weights, inputs[block.index])
        torch.testing.assert_close(
            _logits(model, ids[:2]), _logits(ref, ids[:2]), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize(
    ("family", "down", "o", "head_dim", "per_group"),
    [
        ("llama", "mlp.down_proj", "self_attn.o_proj", 8, 2),
        ("gpt2", "mlp.c_proj", "attn.c_proj", 8, 1),
    ],
)
@pytest.mark.parametrize("heads", [False, True])
def test_width_equals_dense_with_dropped_channels_zeroed(
    family, down, o, head_dim, per_group, heads, data
):
    ids = data.input_ids
    dense = tiny_model(family)
    model = cwca_export.compress(
        copy.deepcopy(dense), make_plan(dense, "prune", RHO), method="width", data=data, heads=heads
    )
    ref = _reference(dense, ids, _width_edit(RHO, down, o if heads else None, head_dim, per_group))
    torch.testing.assert_close(_logits(model, ids[:2]), _logits(ref, ids[:2]), rtol=1e-4, atol=1e-4)
    record = model.config.cwca_compression["blocks"]
    d_ff = 128 if family == "gpt2" else 64
    assert [b["intermediate_size"] for b in record] == [
        cwca_export.compression.width.kept_width(d_ff, r) for r in RHO
    ]
    groups = 4 // per_group
    kept = [cwca_export.compression.width.kept_groups(groups, r) if heads else groups for r in RHO]
    assert [b["num_key_value_heads"] for b in record] == kept
    assert [b["num_attention_heads"] for b in record] == [g * per_group for g in kept]


@pytest.mark.parametrize(("method", "whitened"), [("lowrank", False), ("asvd", True)])
def test_lowrank_equals_truncated_svd_by_hand(method, whitened, data):
    ids = data.input_ids
    dense = tiny_model("llama")
    units = [1, 2]
    options = {"damp": 1e-9} if whitened else {}
    model = cwca_export.compress(
        copy.deepcopy(dense),
        make_plan(dense, "allocate", units),
        method=method,
        data=data,
        rank_step=8,
        **options,
    )
    ref = _reference(dense, ids, _svd_edit(units, 8, whitened))
    torch.testing.assert_close(_logits(model, ids[:2]), _logits(ref, ids[:2]), rtol=1e-3, atol=1e-3)
    # ranks equal the plan wherever r < mn/(m+n); elsewhere the Linear stays dense and says so
    rows = model.config.cwca_compression["steps"][-1]["blocks"]
    attention = {f"self_attn.{p}_proj" for p in "qkvo"}
    mlp = {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert (rows[0]["rank"], rows[1]["rank"]) == (8, 16)
    assert set(rows[0]["factorised"]) == attention | mlp and not rows[0]["dense"]
    assert (
        set(rows[1]["factorised"]) == mlp and set(rows[1]["dense"]) == attention
    )  # 16 >= 32*32/64
    for block in find_blocks(model):
        pairs = [m for m in block.module.modules() if isinstance(m, torch.nn.Sequential)]
        assert len(pairs) == len(rows[block.index]["factorised"])
        assert all(p[0].out_features == rows[block.index]["rank"] for p in pairs)


# ---------------------------------------------------------------- counts per comparison group


def _zeros(w):
    return (weight_out_in(w) == 0).double()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_realised_sparsity_per_block_equals_the_plan(family, method, data):
    model = tiny_model(family)
    plan = make_plan(model, "prune", RHO)
    cwca_export.compress(model, plan, method=method, data=data)
    for block in find_blocks(model):
        rho = RHO[block.index]
        for path, linear in block.linears.items():
            z = _zeros(linear)  # (out, in)
            if method == "wanda":  # each output row is a comparison group
                groups = z.sum(dim=1) - rho * z.shape[1]
            elif method == "sparsegpt":  # each 128-column block (the whole layer here)
                groups = torch.stack([c.sum() - rho * c.numel() for c in z.split(128, dim=1)])
            else:
                groups = (z.sum() - rho * z.numel()).reshape(1)
            assert groups.abs().max() <= 0.5 + 1e-9, path
        realised = model.config.cwca_compression["steps"][-1]["blocks"][block.index]["realised"]
        total = sum(m.weight.numel() for m in block.linears.values())
        assert (
            abs(realised - rho) * total
            <= 0.5
            * sum(
                linear.weight.shape[0 if family == "gpt2" else 1]
                for linear in block.linears.values()
            )
            + 1
        )


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize(("pattern", "n", "m"), [("2:4", 2, 4), ("4:8", 4, 8)])
def test_nm_groups_hold_at_most_n_nonzeros_and_dense_blocks_stay_dense(method, pattern, n, m, data):
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    cwca_export.compress(
        model, make_plan(model, "prune", [0.0, 0.5]), method=method, data=data, nm=pattern
    )
    blocks, dense_blocks = find_blocks(model), find_blocks(dense)
    for path, linear in blocks[1].linears.items():
        w = weight_out_in(linear)
        nonzero = (w != 0).reshape(w.shape[0], -1, m).sum(dim=2)
        assert int(nonzero.max()) <= n, path
        assert float((w == 0).double().mean()) == pytest.approx(1 - n / m)
    for a, b in zip(blocks[0].linears.values(), dense_blocks[0].linears.values(), strict=True):
        assert torch.equal(a.weight, b.weight)  # rho_0 = 0: the plan keeps block 0 dense


def test_sparsegpt_reconstructs_calibration_outputs_better_than_magnitude(data):
    dense = tiny_model("llama")
    block = find_blocks(dense)[0]
    inputs = _capture(dense, data.input_ids, block)  # block 0 sees the same inputs either way
    original = {
        rel: weight_out_in(block.linears[f"{block.name}.{rel}"]).detach().double().numpy()
        for rel in inputs
    }
    errors = {}
    for method in ("magnitude", "sparsegpt"):
        model = copy.deepcopy(dense)
        cwca_export.compress(model, make_plan(dense, "prune", [0.5, 0.5]), method=method, data=data)
        pruned = find_blocks(model)[0]
        errors[method] = {
            rel: np.linalg.norm(
                (weight_out_in(pruned.linears[f"{block.name}.{rel}"]).detach().double().numpy() - w)
                @ x.T
            )
            for rel, w, x in ((rel, original[rel], inputs[rel]) for rel in inputs)
        }
    for rel, err in errors["sparsegpt"].items():
        assert err < errors["magnitude"][rel], rel


# ---------------------------------------------------------------- generate with a KV cache

_CASES = [
    ("magnitude", "prune", {}),
    ("wanda", "prune", {}),
    ("sparsegpt", "prune", {}),
    ("sparsegpt", "prune", {"nm": "2:4"}),
    ("width", "prune", {}),
    ("width", "prune", {"heads": True}),
    ("lowrank", "allocate", {}),
    ("asvd", "allocate", {}),
]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
@pytest.mark.parametrize(("method", "program", "options"), _CASES, ids=lambda c: str(c))
def test_generate_with_kv_cache_after_every_method(family, method, program, options, data):
    model = tiny_model(family)
    x = RHO if program == "prune" else [1, 2]
    cwca_export.compress(model, make_plan(model, program, x), method=method, data=data, **options)
    prompt = data.input_ids[:2, :8]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (2, 14)
    assert torch.equal(cached, uncached)


def test_lm_head_and_embeddings_are_untouched_unless_asked(data):
    model = tiny_model("llama")
    head, embed = model.lm_head.weight.clone(), model.get_input_embeddings().weight.clone()
    cwca_export.compress(model, make_plan(model, "prune", RHO), method="wanda", data=data)
    assert torch.equal(model.lm_head.weight, head) and torch.equal(
        model.get_input_embeddings().weight, embed
    )
    model = tiny_model("llama")
    cwca_export.compress(
        model, make_plan(model, "prune", RHO), method="magnitude", head_sparsity=0.25
    )
    for w in (model.lm_head.weight, model.get_input_embeddings().weight):
        assert abs(float((w == 0).double().mean()) - 0.25) < 1 / w.numel() + 1e-12
    assert model.config.cwca_compression["steps"][-1]["head_sparsity"].keys() == {
        "lm_head",
        "embeddings",
    }


def test_whole_model_and_layer_by_layer_differ_only_after_block_0(data):
    dense = tiny_model("llama")
    plan = make_plan(dense, "prune", RHO)
    a = cwca_export.compress(
        copy.deepcopy(dense), plan, method="sparsegpt", data=data, sequential=True
    )
    b = cwca_export.compress(
        copy.deepcopy(dense), plan, method="sparsegpt", data=data, sequential=False
    )
    first_a, first_b = (find_blocks(m)[0] for m in (a, b))
    for pa, pb in zip(first_a.linears.values(), first_b.linears.values(), strict=True):
        torch.testing.assert_close(pa.weight, pb.weight, rtol=1e-4, atol=1e-5)
    second = [find_blocks(m)[1].linears["model.layers.1.mlp.down_proj"].weight for m in (a, b)]
    assert not torch.allclose(second[0], second[1])  # block 1 saw the pruned block 0's outputs


# ---------------------------------------------------------------- refusals


def test_refusals_are_clear_and_leave_the_model_alone(data):
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    prune, allocate = make_plan(model, "prune", RHO), make_plan(model, "allocate", [1, 2])
    cases = [
        (dict(plan=allocate, method="wanda", data=data), "pruning plan"),
        (dict(plan=prune, method="lowrank"), "allocation plan"),
        (dict(plan=prune, method="wanda"), "needs calibration data"),
        (dict(plan=prune, method="wanda", data=data, rank_step=4), "does not take option"),
        (dict(plan=prune, method="magnitude", nm="3:2"), "N:M"),
        (dict(plan=prune, method="width", importance="scores"), "channel_scores"),
        (dict(plan=make_plan(model, "allocate", [0, 1]), method="lowrank"), "--lo 1"),
        (dict(plan=make_plan(model, "allocate", [1.5, 1]), method="lowrank"), "--integer"),
        (dict(plan=prune, method="shrink"), "choose one of"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            cwca_export.compress(model, **kwargs)
    with pytest.raises(PlanMismatchError, match="blocks"):
        cwca_export.compress(
            model,
            make_plan(tiny_model("llama", num_hidden_layers=3), "prune", [0.1] * 3),
            method="magnitude",
        )
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_phi3_width_handles_the_fused_mlp_and_refuses_heads(data):
    model = tiny_model("phi3")
    dense = copy.deepcopy(model)
    with pytest.raises(ValueError, match="qkv_proj"):
        cwca_export.compress(
            model, make_plan(model, "prune", RHO), method="width", data=data, heads=True
        )
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), dense.state_dict().values(), strict=True)
    )
    cwca_export.compress(model, make_plan(model, "prune", RHO), method="width", data=data)
    assert [m.mlp.gate_up_proj.out_features for m in model.model.layers] == [2 * 48, 2 * 24]
    assert model.generate(data.input_ids[:1, :8], max_new_tokens=4, do_sample=False).shape == (
        1,
        12,
    )


def test_width_takes_given_channel_scores(data):
    model = tiny_model("llama")
    scores = {
        0: torch.arange(64.0),
        1: -torch.arange(64.0),
    }  # keep the last channels, then the first
    cwca_export.compress(
        model,
        make_plan(model, "prune", [0.5, 0.5]),
        method="width",
        importance="scores",
        channel_scores=scores,
    )
    dense = tiny_model("llama")
    torch.testing.assert_close(
        model.model.layers[0].mlp.up_proj.weight, dense.model.layers[0].mlp.up_proj.weight[32:]
    )
    torch.testing.assert_close(
        model.model.layers[1].mlp.down_proj.weight,
        dense.model.layers[1].mlp.down_proj.weight[:, :32],
    )


def test_block_inputs_are_captured_once_per_batch_shape(data):
    from cwca_export.compression.sequential import capture_block_inputs

    model = tiny_model("llama")
    ids = data.input_ids[:5]
    inputs = capture_block_inputs(
        model, find_blocks(model), ids, batch_size=2, device=torch.device("cpu")
    )
    assert [h.shape[0] for h in inputs.hidden] == [2, 2, 1]
    assert sorted(inputs.shared) == [(1, 32), (2, 32)]  # masks and rotary tables: once per shape
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(inputs.hidden), model.model.embed_tokens(ids))


def test_batch_size_does_not_change_the_result(data):
    dense = tiny_model("qwen2")
    plan = make_plan(dense, "prune", RHO)
    one = cwca_export.compress(
        copy.deepcopy(dense), plan, method="sparsegpt", data=data, batch_size=1
    )
    three = cwca_export.compress(
        copy.deepcopy(dense), plan, method="sparsegpt", data=data, batch_size=3
    )
    ids = data.input_ids[:2]
    torch.testing.assert_close(_logits(one, ids), _logits(three, ids), rtol=1e-4, atol=1e-4)
