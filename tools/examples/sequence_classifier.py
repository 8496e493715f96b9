"""A small text classifier in plain PyTorch (no ntrace in it): padded token sequences →
embedding → per-token projection → GELU → LayerNorm → mean over the real tokens → class.

The data is synthetic and offline: sentences of 4 to ``--max-len`` tokens drawn from a
vocabulary in which tokens 1–8 are "positive" words and 9–16 "negative" ones; a sentence's
label is whether it has more positive words, more negative ones, or as many of each. Shorter
sentences are padded with token 0 (``padding_idx``: its embedding stays zero).

Record it unmodified with:
    ntrace record --out seq.zarr -- python tools/examples/sequence_classifier.py --epochs 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

PAD = 0
POSITIVE, NEGATIVE = range(1, 9), range(9, 17)


def make_sentences(n: int, vocab: int, max_len: int, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` padded sentences (n, max_len) of token ids and their labels (n,)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (n, max_len), generator=gen)
    lengths = torch.randint(4, max_len + 1, (n,), generator=gen)
    tokens[torch.arange(max_len) >= lengths[:, None]] = PAD
    pos = ((tokens >= POSITIVE.start) & (tokens < POSITIVE.stop)).sum(1)
    neg = ((tokens >= NEGATIVE.start) & (tokens < NEGATIVE.stop)).sum(1)
    labels = torch.where(pos > neg, 0, torch.where(neg > pos, 1, 2))
    return tokens, labels


class SequenceClassifier(nn.Module):
    def __init__(self, vocab: int, dim: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=PAD)
        self.proj = nn.Linear(dim, hidden)  # applied to every token: (batch, seq, dim)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.act(self.proj(self.embed(tokens))))  # (batch, seq, hidden)
        real = (tokens != PAD).unsqueeze(-1).to(h.dtype)
        pooled = (h * real).sum(1) / real.sum(1).clamp(min=1.0)  # mean over real tokens
        return self.head(pooled)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=40)
    ap.add_argument("--max-len", type=int, default=12)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    tokens, labels = make_sentences(args.sentences, args.vocab, args.max_len, args.seed)
    loader = DataLoader(TensorDataset(tokens, labels), batch_size=args.batch_size, shuffle=True,
                        drop_last=True)
    model = SequenceClassifier(args.vocab, args.dim, args.hidden, classes=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    criterion = nn.CrossEntropyLoss()
    step_times = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        correct = 0
        for batch, target in loader:
            t = time.perf_counter()
            optimizer.zero_grad()
            logits = model(batch)
            loss = criterion(logits, target)
            loss.backward()
            optimizer.step()
            step_times.append(time.perf_counter() - t)
            correct += int((logits.argmax(1) == target).sum())
        accuracy = correct / (len(loader) * args.batch_size)
        print(f"epoch {epoch} loss {loss.item():.4f} accuracy {accuracy:.3f}")
    print(f"train loop: {time.perf_counter() - start:.3f} s, median step "
          f"{1e3 * statistics.median(step_times):.3f} ms over {len(step_times)} steps")


if __name__ == "__main__":
    main()
