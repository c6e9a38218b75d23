"""The trained fixture against its targets (qwen_fast/fixture.py), on held-out standard-library
text, over the full vocabulary:

- held-out perplexity, against an interpolated bigram estimated on the same training text
  (p(w | v) = l c(v, w) / c(v) + (1 - l) p1(w), p1 add-one over the tokenizer's ids; l chosen
  on the first half of the held-out tokens from 0.1..0.9, reported on the second half, and the
  model on the same second half);
- the mean probability the model gives, per scored token, to all ids never seen in training;
- copying: mean loss of tokens whose preceding 3-gram occurred earlier in their window against
  the others.

    python benchmarks/bench_fixture.py --model DIR [--tokens 60000] [--context N]
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from qwen_fast import Engine
from qwen_fast import fixture as FX
from qwen_fast.perplexity import windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=60000, help="held-out tokens scored")
    ap.add_argument("--context", type=int, help="window (default: the model's seq_length)")
    a = ap.parse_args()
    eng = Engine.from_pretrained(a.model, dtype="float32", backend="auto")
    a.context = a.context or eng.cfg.seq_length
    tok = eng.tokenizer
    V = len(tok)
    files = FX.stdlib_files()
    train = FX.token_stream(tok, [f for f in files if not FX.held_out(f[0])]).astype(np.int64)
    held = FX.token_stream(tok, [f for f in files if FX.held_out(f[0])])[:a.tokens].astype(np.int64)
    seen = np.bincount(train, minlength=V)[:V] > 0
    # The model, window by window (each window scores its last tokens once).
    nll = np.zeros(len(held))
    unseen_p, copy_flag = [], np.zeros(len(held), dtype=bool)
    unseen_t = torch.from_numpy(~seen)
    for start, end, first in windows(len(held), a.context, a.context - 1):
        ids = held[start:end].tolist()
        lp = torch.log_softmax(eng.logits(ids)[:, :V].double(), -1)[first - start - 1:end - start - 1]
        tgt = torch.tensor(ids[first - start:])
        nll[first:end] = -lp.gather(1, tgt[:, None])[:, 0].numpy()
        unseen_p.append(lp.exp()[:, unseen_t].sum(-1).numpy())
        copy_flag[first:end] = FX.repeated_trigram(held[start:end])[first - start:]
    unseen_p = np.concatenate(unseen_p)
    # The bigram, estimated on the training stream.
    c1 = np.bincount(train, minlength=V)[:V].astype(np.float64)
    p1 = (c1 + 1) / (c1.sum() + V)
    pair = train[:-1] * V + train[1:]
    keys, counts = np.unique(pair, return_counts=True)

    def bigram_nll(lam, lo, hi):
        v, w = held[lo - 1:hi - 1], held[lo:hi]
        k = v * V + w
        i = np.searchsorted(keys, k)
        i = np.minimum(i, len(keys) - 1)
        c = np.where(keys[i] == k, counts[i], 0)
        cv = c1[v]
        pb = np.where(cv > 0, c / np.maximum(cv, 1), 0.0)
        return -np.log(lam * pb + (1 - lam) * p1[w])

    n = len(held)
    half = n // 2
    lam = min((0.1 * i for i in range(1, 10)), key=lambda l: bigram_nll(l, 1, half).mean())
    big = bigram_nll(lam, half, n).mean()
    model = nll[half:n].mean()
    print(f"held-out tokens scored: {n - 1} (second half {n - half}); context {a.context}")
    print(f"perplexity: model {math.exp(model):.1f}, interpolated bigram {math.exp(big):.1f} "
          f"(lambda {lam:.1f}): ratio {math.exp(model) / math.exp(big):.3f} (target <= 0.75)")
    print(f"unigram perplexity {math.exp(-np.log(p1[held[half:n]]).mean()):.1f}")
    print(f"mean probability on ids never seen in training: {unseen_p.mean():.2e} (target < 1e-3)")
    cp, other = nll[1:][copy_flag[1:]], nll[1:][~copy_flag[1:]]
    print(f"copying: loss {cp.mean():.3f} on {len(cp)} tokens whose preceding 3-gram occurred "
          f"earlier in the window, {other.mean():.3f} on the other {len(other)}: "
          f"{other.mean() - cp.mean():.3f} nat lower (target >= 1)")


if __name__ == "__main__":
    main()
