"""A tiny GPT-2 causal language model from Hugging Face ``transformers``, trained the way its
tutorials write the loop (no ntrace in it): ``outputs = model(**batch, labels=labels)``,
``outputs.loss.backward()``, AdamW. The model shifts the labels itself and takes the mean
cross-entropy over the tokens whose label is not −100 (here: the padding).

The model is built from a config (nothing is downloaded); the data are synthetic and offline:
sequences that count up modulo the vocabulary from a random start (so the next token is
learnable), of random lengths, padded.

    ntrace record --out gpt2.zarr -- python tools/examples/hf_gpt2_lm.py --epochs 1

(a token-level loss is not recordable yet: ntrace stops with a message naming it)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

IGNORE = -100


def make_sequences(n: int, vocab: int, length: int, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` sequences (n, length) of token ids, their attention mask and labels (−100 on
    the padding)."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=gen)
    ids = (start + torch.arange(length)) % vocab
    lengths = torch.randint(length // 2, length + 1, (n,), generator=gen)
    mask = (torch.arange(length) < lengths[:, None]).long()
    labels = torch.where(mask.bool(), ids, IGNORE)
    return ids * mask, mask, labels


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32)
    ap.add_argument("--length", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def build(args: argparse.Namespace) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=args.vocab, n_positions=args.length, n_embd=args.hidden,
                        n_layer=args.layers, n_head=2, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    model.train()
    return model


def main() -> None:
    args = parse()
    torch.manual_seed(args.seed)
    ids, mask, labels = make_sequences(args.sequences, args.vocab, args.length, args.seed)
    loader = DataLoader(TensorDataset(ids, mask, labels), batch_size=args.batch_size,
                        shuffle=True, drop_last=True)
    model = build(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    step_times: list[float] = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        for input_ids, attention_mask, target in loader:
            t = time.perf_counter()
            batch = {"input_ids": input_ids, "attention_mask": attention_mask}
            outputs = model(**batch, labels=target)
            outputs.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step_times.append(time.perf_counter() - t)
        print(f"epoch {epoch} loss {outputs.loss.item():.4f}")
    print(f"train loop: {time.perf_counter() - start:.3f} s, median step "
          f"{1e3 * statistics.median(step_times):.3f} ms over {len(step_times)} steps")


if __name__ == "__main__":
    main()
