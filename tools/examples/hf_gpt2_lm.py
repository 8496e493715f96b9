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

import torch
from hf_bert_classifier import common_arguments, train
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
    common_arguments(ap)
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32)
    ap.add_argument("--length", type=int, default=12)
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
    train(build(args), loader, args)  # the loop of hf_bert_classifier.py, as tutorials write it


if __name__ == "__main__":
    main()
