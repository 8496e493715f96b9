"""A tiny BERT sequence classifier from Hugging Face ``transformers``, trained the way its
tutorials write the loop (no ntrace in it): ``outputs = model(**batch, labels=labels)``,
``outputs.loss.backward()``, AdamW.

The model is built from a config (nothing is downloaded) and the data are synthetic and
offline: the sentences of :mod:`sequence_classifier` (a sentence's label is whether it has
more "positive" tokens, more "negative" ones, or as many of each), with an attention mask
over the padding. Attention-probability dropout is 0 (``attn_implementation="eager"``
applies it as a dropout call ntrace replays; the fused kernel's cannot be).

Record it unmodified with:
    ntrace record --out bert.zarr -- python tools/examples/hf_bert_classifier.py --epochs 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from sequence_classifier import PAD, make_sentences
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForSequenceClassification


def common_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of both Hugging Face examples (this one and ``hf_gpt2_lm.py``)."""
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    common_arguments(ap)
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=40)
    ap.add_argument("--max-len", type=int, default=12)
    return ap.parse_args(argv)


def build(args: argparse.Namespace) -> BertForSequenceClassification:
    config = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                        num_hidden_layers=args.layers, num_attention_heads=2,
                        intermediate_size=2 * args.hidden, max_position_embeddings=args.max_len,
                        num_labels=3, pad_token_id=PAD, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)
    model.train()
    return model


def train(model: torch.nn.Module, loader: DataLoader, args: argparse.Namespace) -> None:
    """The tutorials' loop: batches of (input_ids, attention_mask, labels)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    step_times: list[float] = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        for input_ids, attention_mask, labels in loader:
            t = time.perf_counter()
            batch = {"input_ids": input_ids, "attention_mask": attention_mask}
            outputs = model(**batch, labels=labels)
            outputs.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step_times.append(time.perf_counter() - t)
        print(f"epoch {epoch} loss {outputs.loss.item():.4f}")
    print(f"train loop: {time.perf_counter() - start:.3f} s, median step "
          f"{1e3 * statistics.median(step_times):.3f} ms over {len(step_times)} steps")


def main() -> None:
    args = parse()
    torch.manual_seed(args.seed)
    tokens, labels = make_sentences(args.sentences, args.vocab, args.max_len, args.seed)
    loader = DataLoader(TensorDataset(tokens, (tokens != PAD).long(), labels),
                        batch_size=args.batch_size, shuffle=True, drop_last=True)
    train(build(args), loader, args)


if __name__ == "__main__":
    main()
