"""Train the embedded demo model: a 12-block Llama on the Python-docs corpus.

Why a trained model: layer heterogeneity (what per-layer plans exploit) only appears once
blocks have learned different jobs; random tiny models have none.

    python scripts/train_demo_model.py                # writes cwca_export/assets/demo-llama

Architecture: Llama, 12 blocks, hidden 192, 6 query heads over 2 KV heads (GQA, so head
pruning must keep groups), MLP 512, byte-level BPE vocabulary of 4096 trained on train.txt,
tied embeddings, stored in fp16 (11 MB). Seeded; the committed model took 34 minutes on
2 CPU cores (OMP_WAIT_POLICY=PASSIVE, other jobs running) and reached a held-out perplexity
of 47.1 at sequence length 256; both are recorded in its training.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[1] / "cwca_export" / "assets"


def train_tokenizer(text_path: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(text_path)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=512,
        model_input_names=["input_ids", "attention_mask"],  # no token_type_ids: Llama's generate() refuses them
    )


def encode(tokenizer, path: Path) -> torch.Tensor:
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int, batch: int = 16) -> float:
    """Non-overlapping windows of seq_len tokens; the mean token NLL over all of them."""
    model.eval()
    n = ids.numel() // seq_len
    windows = ids[: n * seq_len].view(n, seq_len)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        x = windows[i : i + batch]
        out = model(input_ids=x, labels=x)
        tokens = x.numel() - x.shape[0]
        total += out.loss.item() * tokens
        count += tokens
    model.train()
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSETS / "demo-llama")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    start = time.time()
    text = ASSETS / "text"
    tokenizer = train_tokenizer(text / "train.txt", args.vocab)
    train_ids = encode(tokenizer, text / "train.txt")
    held_ids = encode(tokenizer, text / "heldout.txt")
    print(f"tokens: train {train_ids.numel():,}, held-out {held_ids.numel():,}", flush=True)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=12,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(args.seed)
    max_start = train_ids.numel() - args.seq_len - 1
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, max_start, (args.batch,), generator=gen)
        x = torch.stack([train_ids[s : s + args.seq_len] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            rate = (step + 1) * args.batch * args.seq_len / (time.time() - start)
            print(f"step {step:5d}  loss {loss.item():.3f}  lr {lr_at(step):.2e}  {rate:,.0f} tok/s", flush=True)

    ppl = perplexity(model, held_ids, args.seq_len)
    wall = time.time() - start
    print(f"held-out perplexity {ppl:.2f} (seq {args.seq_len}); wall {wall / 60:.1f} min", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    (args.out / "training.json").write_text(
        json.dumps(
            {
                "command": "python scripts/train_demo_model.py "
                + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
                "heldout_perplexity_fp32": round(ppl, 3),
                "heldout": "cwca_export/assets/text/heldout.txt",
                "seq_len": args.seq_len,
                "train_tokens_seen": args.steps * args.batch * args.seq_len,
                "train_tokens_available": train_ids.numel(),
                "wall_time_s": round(wall, 1),
                "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                "torch": torch.__version__,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
