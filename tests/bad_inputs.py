"""Builders for the bad-input catalogue: broken, hostile and unsupported files next to good ones.

Every input is made here, from configs and the tiny models of :mod:`helpers`, so the
catalogue (tests/test_bad_inputs.py) and benchmarks/bench_reliability.py see the same world.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from helpers import sample_text, save_tiny_model, tiny_tokenizer

NOT_UTF8 = b"\xff\xfe\x00 caf\xe9 \x81\x82 not utf-8 \xc3\x28"


def marker_path(root: Path) -> Path:
    """The file the hostile model code writes when anything imports it."""
    return root / "REMOTE-CODE-RAN"


_EVIL = '''"""Modelling code of a hostile folder: importing it is the harm (it writes a marker)."""
import pathlib

pathlib.Path({marker!r}).write_text("the folder's own code ran")

from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "evil"


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
'''


@dataclass(frozen=True)
class World:
    """Where every good and bad input lies, built once per session."""

    root: Path

    def expand(self, text: str) -> str:
        """``@name`` -> the path of input ``name`` (``@llama`` -> ROOT/llama)."""
        return re.sub(r"@([\w.-]+)", lambda m: str(self.root / m.group(1)), text)


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def build_world(root: Path) -> World:
    """Write the good model, data, scores and plans, then every broken variant, under ``root``."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, T5Config

    from cwca_export.planning.plan import plan_pruning
    from cwca_export.scoring import score

    root.mkdir(parents=True, exist_ok=True)
    w = World(root)
    llama = save_tiny_model("llama", root / "llama")
    save_tiny_model("llama", root / "llama-other", seed=1)  # same shapes, other weights
    save_tiny_model("llama", root / "llama-3", num_hidden_layers=3)
    (root / "calib.txt").write_text(sample_text(), encoding="utf-8")

    scores = score(str(llama), str(root / "calib.txt"), method="uniform", num_samples=2, seq_len=16, progress=False)
    scores.save(root / "scores.json")
    plan = plan_pruning(scores, 0.3)
    plan.save(root / "plan.json")

    # ---- model folders the tool must refuse
    (root / "empty").mkdir()
    cfg_only = root / "config-only"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_bytes((llama / "config.json").read_bytes())

    bert = root / "bert"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertForMaskedLM(BertConfig(vocab_size=384, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=256)).save_pretrained(bert)
    tiny_tokenizer().save_pretrained(bert)
    t5 = root / "t5"
    T5Config(vocab_size=384, d_model=32, d_ff=64, num_layers=2, num_heads=4,
             architectures=["T5ForConditionalGeneration"]).save_pretrained(t5)
    (t5 / "model.safetensors").write_bytes((llama / "model.safetensors").read_bytes())

    remote = _copy_model(llama, root / "remote")
    config = json.loads((llama / "config.json").read_text())
    config.update(model_type="evil", architectures=["EvilForCausalLM"],
                  auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "evil.py").write_text(_EVIL.format(marker=str(marker_path(root))))

    remote_tok = _copy_model(llama, root / "remote-tokenizer")
    tok_config = json.loads((llama / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (remote_tok / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (remote_tok / "evil.py").write_text(_EVIL.format(marker=str(marker_path(root))))

    pickle = root / "pickle"
    from helpers import tiny_model

    tiny_model("llama").save_pretrained(pickle, safe_serialization=False)
    tiny_tokenizer().save_pretrained(pickle)

    text = (llama / "config.json").read_text()
    _copy_model(llama, root / "config-truncated")
    (root / "config-truncated" / "config.json").write_text(text[: len(text) // 2])
    _copy_model(llama, root / "config-not-utf8")
    (root / "config-not-utf8" / "config.json").write_bytes(NOT_UTF8)
    _copy_model(llama, root / "config-list")
    (root / "config-list" / "config.json").write_text("[1, 2, 3]")

    weights = (llama / "model.safetensors").read_bytes()
    _copy_model(llama, root / "weights-truncated")
    (root / "weights-truncated" / "model.safetensors").write_bytes(weights[: len(weights) - 1000])
    _copy_model(llama, root / "weights-garbage")
    (root / "weights-garbage" / "model.safetensors").write_bytes(b"this is not a safetensors file at all")
    shards = _copy_model(llama, root / "shard-missing")
    (shards / "model.safetensors").unlink()
    (shards / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}})
    )
    tok_broken = _copy_model(llama, root / "tokenizer-truncated")
    (tok_broken / "tokenizer.json").write_text((llama / "tokenizer.json").read_text()[:100])

    # ---- data
    (root / "not-utf8.txt").write_bytes(NOT_UTF8)
    (root / "not-utf8.jsonl").write_bytes(b'{"text": "ok"}\n' + NOT_UTF8 + b"\n")
    (root / "empty.txt").write_text("   \n")
    (root / "calib.csv").write_text("text\nhello\n")
    (root / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "unterminated\n')
    (root / "fieldless.jsonl").write_text('{"body": "the text is under another key"}\n')
    (root / "tiny.txt").write_text("Just a few words.")

    # ---- scores and plans
    s = (root / "scores.json").read_text()
    (root / "scores-truncated.json").write_text(s[: len(s) // 3])
    (root / "scores-not-utf8.json").write_bytes(NOT_UTF8)
    newer = json.loads(s)
    newer["schema_version"] = 99
    (root / "scores-newer.json").write_text(json.dumps(newer))
    p = json.loads((root / "plan.json").read_text())
    (root / "plan-truncated.json").write_text(json.dumps(p)[:200])
    unfingerprinted = json.loads(json.dumps(p))
    unfingerprinted["model"] = {}
    (root / "plan-no-fingerprint.json").write_text(json.dumps(unfingerprinted))
    beyond = json.loads(json.dumps(p))
    beyond["blocks"][0]["rho"] = beyond["blocks"][0]["hi"] + 0.02
    (root / "plan-beyond-bounds.json").write_text(json.dumps(beyond))
    full = json.loads(json.dumps(p))
    full["blocks"][1].update(rho=1.0, hi=1.0)
    (root / "plan-rho-one.json").write_text(json.dumps(full))
    nan = json.dumps(p).replace(f'"rho": {p["blocks"][0]["rho"]!r}', '"rho": NaN', 1)
    (root / "plan-nan.json").write_text(nan)
    (root / "plan-not-utf8.json").write_bytes(NOT_UTF8)
    (root / "unknown-type.json").write_text(json.dumps({"_type": "Recipe", "schema_version": 1}))
    allocate = json.loads(json.dumps(p))
    allocate["program"] = "allocate"
    for row in allocate["blocks"]:
        row.update(units=2.0, lo=0.0, hi=4.0, cost=1.0)
    (root / "plan-allocate.json").write_text(json.dumps(allocate))

    # ---- hardware profiles and recipes
    (root / "profile-broken.yaml").write_text("name: x\nmemory: [8GiB\nep: cpu\n")
    (root / "profile-not-utf8.yaml").write_bytes(NOT_UTF8)
    (root / "profile-unknown.yaml").write_text("description: d\nmemory: 8GiB\nep: cpu\ndtype: fp32\nturbo: yes\n")
    (root / "profile-list.yaml").write_text("- 1\n- 2\n")
    (root / "profile-python.yaml").write_text("memory: !!python/object/apply:os.system ['echo hi']\n")
    recipe = {
        "model": str(llama), "data": str(root / "calib.txt"), "samples": 2, "seq_len": 16,
        "score": {"method": "uniform"}, "plan": {"program": "prune", "sparsity": 0.3},
        "compress": {"method": "magnitude"},
    }
    import yaml

    def write_recipe(name: str, **changes):
        (root / name).write_text(yaml.safe_dump({**recipe, **changes}))

    write_recipe("recipe-good.yaml")
    write_recipe("recipe-bert.yaml", model=str(bert))
    write_recipe("recipe-pickle.yaml", model=str(pickle))
    write_recipe("recipe-remote.yaml", model=str(remote))
    write_recipe("recipe-long.yaml", seq_len=4096)
    write_recipe("recipe-unknown-key.yaml", turbo=True)
    (root / "recipe-broken.yaml").write_text("model: [unclosed\n")
    (root / "recipe-not-utf8.yaml").write_bytes(NOT_UTF8)
    (root / "recipe-python.yaml").write_text("model: !!python/object/apply:os.system ['echo pwned']\n")

    report = root / "report-truncated"
    report.mkdir()
    (report / "plan.json").write_text(json.dumps(p)[:150])
    (root / "report-empty").mkdir()
    return w


# ---------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Case:
    """One bad input: the command line, what its one error line must name, what must not appear.

    ``expect``: substrings of the error line, the file or flag at fault and the fix's flag
    (``@name`` expands to an input's path). ``absent``: outputs that must not exist after.
    ``stdin``: text piped in (``y`` answers any library prompt yes).
    """

    id: str
    argv: tuple[str, ...]
    expect: tuple[str, ...]
    absent: tuple[str, ...] = ()
    stdin: str | None = None


def _c(id: str, argv: str, *expect: str, absent: tuple[str, ...] = (), stdin: str | None = None) -> Case:
    return Case(id, tuple(argv.split()), expect, absent, stdin)


_S = "score @llama --data @calib.txt --samples 2 --seq-len 16 --no-progress --out @out/s.json"
_C = "compress @llama --plan @plan.json --method magnitude --out @out/c"
_E = "export @llama --out @out/e --runs 1 --warmup 0"
_V = "eval @llama --data @calib.txt --seq-len 32"
_R = ("refine @llama --scores @scores.json --sparsity 0.3 --data @calib.txt --samples 2 --seq-len 16 --max-evals 2"
      " --method magnitude --out @out/r.json")

CASES: tuple[Case, ...] = (
    # ---- score: model folders
    _c("score-no-model-arg", "score --data @calib.txt", "MODEL_DIR", "--help"),
    _c("score-missing-folder", _S.replace("@llama", "@nope"), "@nope", "--help"),
    _c("score-empty-folder", _S.replace("@llama", "@empty"), "@empty", "config.json"),
    _c("score-config-only", _S.replace("@llama", "@config-only"), "@config-only", "no weights"),
    _c("score-bert", _S.replace("@llama", "@bert"), "@bert/config.json", "BertForMaskedLM", "causal"),
    _c("score-t5", _S.replace("@llama", "@t5"), "@t5/config.json", "T5ForConditionalGeneration"),
    _c("score-remote-code", _S.replace("@llama", "@remote"), "@remote/config.json", "--trust-remote-code",
       stdin="y\ny\n"),
    _c("score-remote-tokenizer", _S.replace("@llama", "@remote-tokenizer"), "tokenizer_config.json",
       "--trust-remote-code", stdin="y\n"),
    _c("score-pickle", _S.replace("@llama", "@pickle"), "@pickle/pytorch_model.bin", "--allow-pickle"),
    _c("score-config-truncated", _S.replace("@llama", "@config-truncated"), "@config-truncated/config.json",
       "not valid JSON"),
    _c("score-config-not-utf8", _S.replace("@llama", "@config-not-utf8"), "@config-not-utf8/config.json", "UTF-8"),
    _c("score-config-list", _S.replace("@llama", "@config-list"), "@config-list/config.json", "JSON object"),
    _c("score-weights-truncated", _S.replace("@llama", "@weights-truncated"), "@weights-truncated/model.safetensors",
       "truncated"),
    _c("score-weights-garbage", _S.replace("@llama", "@weights-garbage"), "@weights-garbage/model.safetensors"),
    _c("score-shard-missing", _S.replace("@llama", "@shard-missing"), "model.safetensors.index.json",
       "model-00001-of-00002"),
    _c("score-tokenizer-truncated", _S.replace("@llama", "@tokenizer-truncated"),
       "@tokenizer-truncated/tokenizer.json"),
    # ---- score: flags and data
    _c("score-seq-len-beyond-positions", _S.replace("16", "4096"), "--seq-len 4096", "max_position_embeddings", "256"),
    _c("score-seq-len-zero", _S.replace("--seq-len 16", "--seq-len 0"), "--seq-len"),
    _c("score-samples-zero", _S.replace("--samples 2", "--samples 0"), "--samples"),
    _c("score-batch-size-zero", _S + " --batch-size 0", "--batch-size"),
    _c("score-damping-nan", _S + " --damping nan", "--damping"),
    _c("score-damping-inf", _S + " --damping inf", "--damping"),
    _c("score-held-out-negative", _S + " --held-out -1", "--held-out"),
    _c("score-method-unknown", _S + " --estimator oracle", "--estimator"),
    _c("score-option-malformed", _S + " --option pruner", "--option"),
    _c("score-device-memory-malformed", _S + " --device-map auto --device-memory lots", "--device-memory"),
    _c("score-data-missing", _S.replace("@calib.txt", "@nothing.txt"), "@nothing.txt", "--data"),
    _c("score-data-not-utf8", _S.replace("@calib.txt", "@not-utf8.txt"), "@not-utf8.txt", "UTF-8", "--data"),
    _c("score-data-jsonl-not-utf8", _S.replace("@calib.txt", "@not-utf8.jsonl"), "@not-utf8.jsonl", "UTF-8"),
    _c("score-data-csv", _S.replace("@calib.txt", "@calib.csv"), "@calib.csv", "--data"),
    _c("score-data-plain-folder", _S.replace("@calib.txt", "@llama"), "save_to_disk", "--data"),
    _c("score-data-empty", _S.replace("@calib.txt", "@empty.txt"), "@empty.txt", "--data"),
    _c("score-data-broken-jsonl", _S.replace("@calib.txt", "@broken.jsonl"), "@broken.jsonl:2", "--data"),
    _c("score-data-jsonl-field", _S.replace("@calib.txt", "@fieldless.jsonl"), "@fieldless.jsonl:1", "--text-field"),
    _c("score-data-too-short", _S.replace("--samples 2", "--samples 500"), "@calib.txt", "--samples", "--allow-fewer"),
    _c("score-debias-unsupported", _S + " --debias --estimator uniform", "debias", "--estimator"),
    # ---- plan
    _c("plan-scores-missing", "plan @nothing.json --sparsity 0.3 --out @out/p.json", "@nothing.json"),
    _c("plan-scores-truncated", "plan @scores-truncated.json --sparsity 0.3 --out @out/p.json",
       "@scores-truncated.json", "not valid JSON"),
    _c("plan-scores-not-utf8", "plan @scores-not-utf8.json --sparsity 0.3 --out @out/p.json", "@scores-not-utf8.json",
       "UTF-8"),
    _c("plan-scores-newer", "plan @scores-newer.json --sparsity 0.3 --out @out/p.json", "@scores-newer.json",
       "schema_version 99"),
    _c("plan-given-a-plan", "plan @plan.json --sparsity 0.3 --out @out/p.json", "@plan.json", "expected LayerScores"),
    _c("plan-sparsity-nan", "plan @scores.json --sparsity nan --out @out/p.json", "--sparsity"),
    _c("plan-sparsity-above-one", "plan @scores.json --sparsity 1.5 --out @out/p.json", "--sparsity"),
    _c("plan-sparsity-missing", "plan @scores.json --out @out/p.json", "--sparsity"),
    _c("plan-bounds-malformed", "plan @scores.json --sparsity 0.3 --bounds zero:0.3 --out @out/p.json", "--bounds"),
    _c("plan-bounds-nan", "plan @scores.json --sparsity 0.3 --bounds 0:nan --out @out/p.json", "--bounds"),
    _c("plan-bounds-no-such-block", "plan @scores.json --sparsity 0.3 --bounds 99:0.3 --out @out/p.json", "--bounds",
       "99"),
    _c("plan-hi-nan", "plan @scores.json --sparsity 0.3 --hi nan --out @out/p.json", "--hi"),
    _c("plan-eta-zero", "plan @scores.json --sparsity 0.3 --eta 0 --out @out/p.json", "--eta"),
    _c("plan-kappa-inf", "plan @scores.json --sparsity 0.3 --kappa inf --out @out/p.json", "--kappa"),
    _c("plan-tau-negative", "plan @scores.json --sparsity 0.3 --tau -1 --out @out/p.json", "--tau"),
    _c("plan-allocate-no-budget", "plan @scores.json --program allocate --out @out/p.json", "--budget"),
    _c("plan-budget-fraction-zero", "plan @scores.json --program allocate --budget-fraction 0 --out @out/p.json",
       "--budget-fraction"),
    _c("plan-model-remote-code",
       "plan @scores.json --program allocate --budget-fraction 0.5 --model @remote --out @out/p.json",
       "@remote/config.json", "--trust-remote-code", stdin="y\ny\n"),
    _c("plan-model-bert", "plan @scores.json --program allocate --budget-fraction 0.5 --model @bert --out @out/p.json",
       "BertForMaskedLM"),
    _c("plan-rank-step-zero",
       "plan @scores.json --program allocate --budget-fraction 0.5 --rank-step 0 --out @out/p.json", "--rank-step"),
    # ---- refine
    _c("refine-bert", _R.replace("refine @llama", "refine @bert"), "BertForMaskedLM"),
    _c("refine-remote-code", _R.replace("refine @llama", "refine @remote"), "--trust-remote-code", stdin="y\n"),
    _c("refine-pickle", _R.replace("refine @llama", "refine @pickle"), "--allow-pickle"),
    _c("refine-seq-len-beyond-positions", _R.replace("--seq-len 16", "--seq-len 1024"), "--seq-len 1024", "256"),
    _c("refine-max-evals-zero", _R.replace("--max-evals 2", "--max-evals 0"), "--max-evals"),
    _c("refine-sparsity-nan", _R.replace("--sparsity 0.3", "--sparsity nan"), "--sparsity"),
    _c("refine-no-sparsity", _R.replace("--sparsity 0.3", ""), "--sparsity"),
    _c("refine-scores-truncated", _R.replace("@scores.json", "@scores-truncated.json"), "@scores-truncated.json"),
    _c("refine-data-not-utf8", _R.replace("@calib.txt", "@not-utf8.txt"), "@not-utf8.txt", "--data"),
    _c("refine-samples-zero", _R.replace("--samples 2", "--samples 0"), "--samples"),
    _c("refine-too-few-evals-to-tune",
       _R.replace("--max-evals 2", "--max-evals 3").replace(" --method magnitude", " --method magnitude --tune"),
       "--max-evals", "--no-tune"),
    # ---- compress
    _c("compress-no-plan", "compress @llama --method magnitude --out @out/c", "--plan", absent=("out/c",)),
    _c("compress-plan-truncated", _C.replace("@plan.json", "@plan-truncated.json"), "@plan-truncated.json",
       absent=("out/c",)),
    _c("compress-plan-not-utf8", _C.replace("@plan.json", "@plan-not-utf8.json"), "@plan-not-utf8.json", "UTF-8"),
    _c("compress-plan-beyond-bounds", _C.replace("@plan.json", "@plan-beyond-bounds.json"), "@plan-beyond-bounds.json",
       "outside its own bounds", "--hi", absent=("out/c",)),
    _c("compress-plan-rho-one", _C.replace("@plan.json", "@plan-rho-one.json"), "@plan-rho-one.json", "[0, 1)", "--hi"),
    _c("compress-plan-nan", _C.replace("@plan.json", "@plan-nan.json"), "@plan-nan.json", "non-finite"),
    _c("compress-plan-no-fingerprint", _C.replace("@plan.json", "@plan-no-fingerprint.json"), "fingerprint",
       "--no-fingerprint", absent=("out/c",)),
    _c("compress-plan-other-weights", _C.replace("compress @llama", "compress @llama-other"), "fingerprint",
       "--no-fingerprint", absent=("out/c",)),
    _c("compress-plan-other-dtype", _C + " --dtype bfloat16", "bfloat16", "--dtype float32", absent=("out/c",)),
    _c("compress-plan-other-depth", _C.replace("compress @llama", "compress @llama-3"), "2 blocks", "3"),
    _c("compress-plan-wrong-program", _C.replace("@plan.json", "@plan-allocate.json"), "--program prune"),
    _c("compress-bert", _C.replace("compress @llama", "compress @bert"), "BertForMaskedLM", absent=("out/c",)),
    _c("compress-remote-code", _C.replace("compress @llama", "compress @remote"), "--trust-remote-code", stdin="y\n"),
    _c("compress-pickle", _C.replace("compress @llama", "compress @pickle"), "--allow-pickle"),
    _c("compress-weights-truncated", _C.replace("compress @llama", "compress @weights-truncated"),
       "@weights-truncated/model.safetensors"),
    _c("compress-seq-len-beyond-positions", _C + " --data @calib.txt --seq-len 300", "--seq-len 300"),
    _c("compress-batch-size-zero", _C + " --batch-size 0", "--batch-size"),
    _c("compress-head-sparsity-nan", _C + " --head-sparsity nan", "--head-sparsity"),
    _c("compress-nm-malformed", _C + " --nm 4:2", "--nm"),
    _c("compress-wanda-without-data", _C.replace("magnitude", "wanda"), "--data"),
    _c("compress-data-not-utf8", _C + " --data @not-utf8.txt --seq-len 16", "@not-utf8.txt", "--data"),
    _c("compress-method-unknown", _C.replace("magnitude", "dropout"), "--method"),
    # ---- inspect
    _c("inspect-missing", "inspect @nothing", "@nothing", "--help"),
    _c("inspect-config-only", "inspect @config-only", "@config-only", "no weights"),
    _c("inspect-bert", "inspect @bert", "BertForMaskedLM"),
    _c("inspect-t5", "inspect @t5", "T5ForConditionalGeneration"),
    _c("inspect-remote-code", "inspect @remote", "@remote/config.json", "--trust-remote-code", stdin="y\ny\ny\n"),
    _c("inspect-pickle", "inspect @pickle", "--allow-pickle"),
    _c("inspect-config-truncated", "inspect @config-truncated", "@config-truncated/config.json"),
    _c("inspect-weights-truncated", "inspect @weights-truncated", "@weights-truncated/model.safetensors"),
    _c("inspect-json-truncated", "inspect @scores-truncated.json", "@scores-truncated.json"),
    _c("inspect-json-not-utf8", "inspect @plan-not-utf8.json", "@plan-not-utf8.json", "UTF-8"),
    _c("inspect-json-unknown-type", "inspect @unknown-type.json", "@unknown-type.json", "'Recipe'"),
    _c("inspect-plan-beyond-bounds", "inspect @plan-beyond-bounds.json", "@plan-beyond-bounds.json", "--hi"),
    # ---- export
    _c("export-bert", _E.replace("export @llama", "export @bert"), "BertForMaskedLM", absent=("out/e",)),
    _c("export-remote-code", _E.replace("export @llama", "export @remote"), "--trust-remote-code", stdin="y\n"),
    _c("export-pickle", _E.replace("export @llama", "export @pickle"), "--allow-pickle", absent=("out/e",)),
    _c("export-config-truncated", _E.replace("export @llama", "export @config-truncated"), "config.json"),
    _c("export-max-memory-malformed", _E + " --max-memory lots", "--max-memory"),
    _c("export-max-memory-zero", _E + " --max-memory 0", "--max-memory"),
    _c("export-max-latency-nan", _E + " --max-latency-ms nan", "--max-latency-ms"),
    _c("export-max-prefill-negative", _E + " --max-prefill-ms -5", "--max-prefill-ms"),
    _c("export-runs-zero", _E.replace("--runs 1", "--runs 0"), "--runs"),
    _c("export-batch-zero", _E + " --batch-size 0", "--batch-size"),
    _c("export-context-beyond-positions", _E + " --context 4096", "--context 4096", "256"),
    _c("export-context-below-prompt", _E + " --prompt-len 64 --context 32", "--context", "--prompt-len"),
    _c("export-hardware-unknown", _E + " --hardware toaster", "toaster", "--hardware"),
    _c("export-hardware-broken-yaml", _E + " --hardware @profile-broken.yaml", "@profile-broken.yaml", "YAML",
       "--hardware"),
    _c("export-hardware-not-utf8", _E + " --hardware @profile-not-utf8.yaml", "@profile-not-utf8.yaml", "--hardware"),
    _c("export-hardware-unknown-key", _E + " --hardware @profile-unknown.yaml", "turbo", "--hardware"),
    _c("export-hardware-list", _E + " --hardware @profile-list.yaml", "@profile-list.yaml", "--hardware"),
    _c("export-hardware-python-tag", _E + " --hardware @profile-python.yaml", "@profile-python.yaml", "--hardware"),
    _c("export-exclude-without-quantize", _E + " --exclude lm_head", "--exclude"),
    _c("export-exclude-layers-malformed", _E + " --quantize int8 --exclude-layers a-b", "--exclude-layers"),
    _c("export-block-size-zero", _E + " --quantize int4 --block-size 0", "--block-size"),
    _c("export-threshold-malformed", _E + " --external-data-threshold huge", "--external-data-threshold"),
    _c("export-plan-truncated", _E + " --plan @plan-truncated.json", "@plan-truncated.json"),
    _c("export-plan-no-fingerprint", _E + " --plan @plan-no-fingerprint.json --method magnitude", "--no-fingerprint",
       absent=("out/e",)),
    _c("export-quantize-unknown", _E + " --quantize int3", "--quantize"),
    _c("export-max-disk-malformed", _E + " --max-disk lots", "--max-disk"),
    _c("export-levels-zero", _E + " --plan @plan.json --levels 0", "--levels"),
    _c("export-dense-storage-with-budget", _E + " --plan @plan.json --method magnitude --max-disk 1MB",
       "--method magnitude", "--method width", absent=("out/e",)),
    # ---- eval
    _c("eval-no-data", "eval @llama", "--data"),
    _c("eval-bert", _V.replace("eval @llama", "eval @bert"), "BertForMaskedLM"),
    _c("eval-remote-code", _V.replace("eval @llama", "eval @remote"), "--trust-remote-code", stdin="y\n"),
    _c("eval-remote-tokenizer", _V.replace("eval @llama", "eval @remote-tokenizer"), "--trust-remote-code",
       stdin="y\n"),
    _c("eval-pickle", _V.replace("eval @llama", "eval @pickle"), "--allow-pickle"),
    _c("eval-seq-len-beyond-positions", _V.replace("--seq-len 32", "--seq-len 4096"), "--seq-len 4096", "256"),
    _c("eval-seq-len-one", _V.replace("--seq-len 32", "--seq-len 1"), "--seq-len"),
    _c("eval-batch-size-zero", _V + " --batch-size 0", "--batch-size"),
    _c("eval-stride-zero", _V + " --stride 0", "--stride"),
    _c("eval-stride-beyond-window", _V + " --stride 64", "--stride"),
    _c("eval-max-tokens-zero", _V + " --max-tokens 0", "--max-tokens"),
    _c("eval-data-not-utf8", _V.replace("@calib.txt", "@not-utf8.txt"), "@not-utf8.txt", "--data"),
    _c("eval-data-empty", _V.replace("@calib.txt", "@empty.txt"), "@empty.txt", "--data"),
    _c("eval-tokenizer-truncated", _V.replace("eval @llama", "eval @tokenizer-truncated"), "@tokenizer-truncated"),
    # ---- demo, report, run, the group
    _c("demo-sparsity-nan", "demo --out @out/d --sparsity nan", "--sparsity", absent=("out/d",)),
    _c("demo-max-disk-fraction-zero", "demo --out @out/d --max-disk-fraction 0", "--max-disk-fraction",
       absent=("out/d",)),
    _c("demo-max-latency-negative", "demo --out @out/d --max-latency-ms -1", "--max-latency-ms", absent=("out/d",)),
    _c("demo-max-disk-fraction-above-one", "demo --out @out/d --max-disk-fraction 1.5", "--max-disk-fraction",
       absent=("out/d",)),
    _c("demo-removed-option", "demo --out @out/d --quantize int8", "--quantize", absent=("out/d",)),
    _c("report-missing", "report @nothing", "@nothing"),
    _c("report-no-plan", "report @report-empty", "@report-empty"),
    _c("report-plan-truncated", "report @report-truncated", "@report-truncated/plan.json"),
    _c("run-recipe-missing", "run @nothing.yaml --out @out/run", "@nothing.yaml", absent=("out/run",)),
    _c("run-recipe-broken-yaml", "run @recipe-broken.yaml --out @out/run", "@recipe-broken.yaml", "YAML",
       absent=("out/run",)),
    _c("run-recipe-not-utf8", "run @recipe-not-utf8.yaml --out @out/run", "@recipe-not-utf8.yaml", "UTF-8",
       absent=("out/run",)),
    _c("run-recipe-python-tag", "run @recipe-python.yaml --out @out/run", "@recipe-python.yaml", absent=("out/run",)),
    _c("run-recipe-unknown-key", "run @recipe-unknown-key.yaml --out @out/run", "turbo", absent=("out/run",)),
    _c("run-recipe-bert", "run @recipe-bert.yaml --out @out/run", "BertForMaskedLM", absent=("out/run",)),
    _c("run-recipe-pickle", "run @recipe-pickle.yaml --out @out/run", "--allow-pickle", absent=("out/run",)),
    _c("run-recipe-remote-code", "run @recipe-remote.yaml --out @out/run", "--trust-remote-code", absent=("out/run",),
       stdin="y\ny\n"),
    _c("run-recipe-seq-len-beyond-positions", "run @recipe-long.yaml --out @out/run", "seq_len 4096", "256",
       absent=("out/run",)),
    _c("run-no-out", "run @recipe-good.yaml", "--out"),
    _c("unknown-verb", "squash @llama", "squash", "--help"),
    _c("unknown-global-option", "--turbo score", "--turbo"),
)


# ---------------------------------------------------------------- running and judging a case


@dataclass(frozen=True)
class Outcome:
    """What one case did and every way it fell short of a clear error (none: clear)."""

    case: Case
    exit_code: int
    stderr: str
    problems: tuple[str, ...]

    @property
    def clear(self) -> bool:
        return not self.problems


def judge(world: World, case: Case, exit_code: int, stdout: str, stderr: str) -> Outcome:
    """A clear error: non-zero exit, one ``Error:`` line naming what the case expects and a
    ``--flag``, no traceback, no output left behind, no folder code run."""
    problems = []
    lines = stderr.strip().splitlines()
    line = lines[-1] if lines else ""
    if exit_code == 0:
        problems.append("exit code 0")
    if len(lines) != 1:
        problems.append(f"{len(lines)} lines on stderr")
    if "Traceback" in stdout + stderr:
        problems.append("a traceback")
    if not line.startswith("Error: "):
        problems.append("no 'Error:' line")
    if not re.search(r"--[a-z][a-z-]+", line):
        problems.append("no --flag in the hint")
    for text in case.expect:
        if world.expand(text) not in line:
            problems.append(f"does not name {text!r}")
    for rel in case.absent:
        if (world.root / rel).exists():
            problems.append(f"left {rel} behind")
    if marker_path(world.root).exists():
        problems.append("the folder's own code ran")
        marker_path(world.root).unlink()  # so that the next case is judged on its own
    return Outcome(case, exit_code, stderr, tuple(problems))


def run_in_process(world: World, case: Case) -> Outcome:
    """The case through click's test runner: the real CLI, in this process (fast)."""
    from click.testing import CliRunner

    from cwca_export.cli import cli

    argv = [world.expand(a) for a in case.argv]
    result = CliRunner().invoke(cli, argv, input=case.stdin, prog_name="cwca-export")
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        stderr += "".join(traceback.format_exception(result.exception))
    return judge(world, case, result.exit_code, result.stdout, stderr)


def run_subprocess(world: World, case: Case, timeout: float = 120) -> Outcome:
    """The case as a user runs it: ``python -m cwca_export ...`` in a child process."""
    import os
    import subprocess
    import sys

    import cwca_export

    repo = str(Path(cwca_export.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    env.pop("CWCA_DEBUG", None)
    argv = [world.expand(a) for a in case.argv]
    done = subprocess.run([sys.executable, "-m", "cwca_export", *argv], input=case.stdin or "", capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=world.root)
    return judge(world, case, done.returncode, done.stdout, done.stderr)
