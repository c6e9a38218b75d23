"""Perplexity of a text file, and KL divergence against a saved base run, as llama.cpp's
``llama-perplexity`` (with ``--kl-divergence-base`` / ``--kl-divergence``) reports them.

    qwen-fast perplexity --model DIR --file F [--context 512] [--stride N] [--dtype ...]
        [--quant int4|int8] [--lm-head-quant int4|int8] [--save-logits BASE.npz]
        [--kl-base BASE.npz] [--json OUT]

Windows: the file's tokens are read in windows of ``context`` tokens, one every ``stride``
tokens (default context // 2). The first window scores all its tokens but the first; every later
one only its last ``stride`` (the others were scored with less context before), so each token
after the first is scored once, with at least context - stride tokens before it (the whole
window for the first ones). Each window is one prefill of the engine (Engine.logits).

Saved logits take a bounded amount of disk: for every scored token, the ``TOP_K`` = 32 most
likely ids with their log-probabilities and the log of the rest's total probability (32 x 8 +
4 bytes a token: 26 MB for 100,000 tokens, against 600 KB a token for full fp32 logits). The KL
divergence against such a base is that of the two distributions coarsened to the base's 32 ids
plus "the rest": a lower bound of the full KL (the coarsening can only lose divergence), exact
when the mass outside the base's top 32 is the same. It is reported with the mean, the 99th
percentile, the top-1 agreement (the run's most likely id is the base's) and the perplexity
ratio; the base must have been made from the same tokens, context and stride (checked).
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .errors import RequestError

TOP_K = 32
FORMAT = "qwen_fast-logits-v1"


def windows(n: int, context: int, stride: int) -> List[Tuple[int, int, int]]:
    """(start, end, first scored position) of each window over n tokens: tokens
    [start, end) are fed, positions first..end-1 are scored (position p predicts token p from
    the tokens before it), every position 1..n-1 exactly once."""
    if n < 2:
        raise RequestError.of("file", f"the text has {n} token(s); perplexity needs at least 2")
    out, start, scored = [], 0, 1
    while scored < n:
        end = min(n, start + context)
        out.append((start, end, scored))
        scored = end
        if end == n:
            break
        start = end - (context - stride) if stride < context else end - 1
        start = max(0, min(start, end - 1))
    return out


def _digest(ids: List[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int32).tobytes()).hexdigest()


def _scored_logprobs(engine, ids: List[int], context: int, stride: int,
                     progress: Optional[Callable[[int, int], None]]):
    """For each window: (log-probabilities [scored, V] in float64 over the tokenizer's ids, the
    scored tokens' ids): the one forward-and-normalize loop of evaluate and evaluate_against."""
    wins = windows(len(ids), context, stride)
    V = len(engine.tokenizer)
    for w, (start, end, first) in enumerate(wins):
        logits = engine.logits(ids[start:end])[:, :V]          # fp32 [end - start, V]
        # the rows predicting tokens first..end-1
        yield (torch.log_softmax(logits[first - start - 1:end - start - 1].double(), dim=-1),
               torch.tensor(ids[first:end], dtype=torch.long))
        if progress is not None:
            progress(w + 1, len(wins))


def evaluate(engine, ids: List[int], context: int = 512, stride: Optional[int] = None,
             progress: Optional[Callable[[int, int], None]] = None, top_k: int = TOP_K) -> Dict:
    """NLL of every scored token and, per token, the top_k ids / log-probabilities and the
    rest's log-mass (the saved form). Returns arrays and the run's parameters."""
    if not isinstance(context, int) or context < 2:
        raise RequestError.of("context", f"context must be an integer >= 2, got {context!r}")
    if context >= engine.cfg.max_context:
        raise RequestError.of("context", f"context {context} is not below the model's context "
                                         f"{engine.cfg.max_context}")
    stride = context // 2 if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= context - 1:
        raise RequestError.of("stride", f"stride must be an integer in [1, context - 1 = "
                                        f"{context - 1}], got {stride!r}")
    nll, top_ids, top_lp, rest = [], [], [], []
    for lp, target in _scored_logprobs(engine, ids, context, stride, progress):
        nll.append(-lp.gather(1, target[:, None])[:, 0])
        v, i = torch.topk(lp, min(top_k, lp.shape[1]), dim=-1)
        top_ids.append(i.to(torch.int32))
        top_lp.append(v.float())
        mass = v.exp().sum(-1).clamp(max=1.0)
        rest.append(torch.log1p(-mass.clamp(max=1 - 1e-15)).float())
    return {"nll": torch.cat(nll).double().numpy(), "top_ids": torch.cat(top_ids).numpy(),
            "top_logprobs": torch.cat(top_lp).numpy(), "rest_logprob": torch.cat(rest).numpy(),
            "context": context, "stride": stride, "digest": _digest(ids), "tokens": len(ids)}


def save_logits(path, run: Dict) -> None:
    np.savez_compressed(path, format=FORMAT, top_ids=run["top_ids"], top_logprobs=run["top_logprobs"],
                        rest_logprob=run["rest_logprob"], nll=run["nll"],
                        meta=json.dumps({k: run[k] for k in ("context", "stride", "digest", "tokens")}))


def load_logits(path) -> Dict:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["format"]) != FORMAT:
                raise ValueError(f"format {str(z['format'])!r}")
            out = {k: z[k] for k in ("top_ids", "top_logprobs", "rest_logprob", "nll")}
            out.update(json.loads(str(z["meta"])))
    except (OSError, KeyError, ValueError) as e:
        raise RequestError.of("kl_base", f"{path}: not a logits file saved by qwen-fast perplexity "
                                         f"--save-logits ({e})") from None
    return out


def evaluate_against(engine, ids: List[int], base: Dict,
                     progress: Optional[Callable[[int, int], None]] = None) -> Tuple[Dict, Dict]:
    """evaluate() and, per scored token, the run's log-probabilities of the base's top ids (for
    the KL on the base's support). Returns (run, kl stats)."""
    context, stride = int(base["context"]), int(base["stride"])
    if _digest(ids) != base["digest"]:
        raise RequestError.of("kl_base", "the base run was made from other tokens (a different "
                                         "text or tokenizer); use the same --file")
    base_ids = torch.from_numpy(base["top_ids"].astype(np.int64))
    base_lp = torch.from_numpy(base["top_logprobs"].astype(np.float64))
    base_rest = torch.from_numpy(base["rest_logprob"].astype(np.float64))
    nll, kls, agree, row = [], [], [], 0
    for lp, target in _scored_logprobs(engine, ids, context, stride, progress):
        m = lp.shape[0]
        if row + m > base_ids.shape[0]:
            break                                              # reported below
        bi, bl, br = base_ids[row:row + m], base_lp[row:row + m], base_rest[row:row + m]
        nll.append(-lp.gather(1, target[:, None])[:, 0])
        q = lp.gather(1, bi)                                  # run's logprobs of the base's ids
        q_rest = torch.log1p(-q.exp().sum(-1).clamp(max=1 - 1e-15))
        kl = (bl.exp() * (bl - q)).sum(-1) + br.exp() * (br - q_rest)
        kls.append(kl.clamp(min=0))
        agree.append(lp.argmax(-1) == bi[:, 0])
        row += m
    if row != base_ids.shape[0]:
        raise RequestError.of("kl_base", f"the base run scored {base_ids.shape[0]} tokens, this "
                                         f"one {row}")
    nll_t, kl_t = torch.cat(nll), torch.cat(kls)
    ppl = math.exp(float(nll_t.mean()))
    base_ppl = math.exp(float(np.mean(base["nll"])))
    stats = {"kl_mean": float(kl_t.mean()), "kl_p99": float(torch.quantile(kl_t, 0.99)),
             "kl_max": float(kl_t.max()), "top1_agreement": float(torch.cat(agree).float().mean()),
             "base_perplexity": base_ppl, "perplexity_ratio": ppl / base_ppl}
    run = {"nll": nll_t.numpy(), "context": context, "stride": stride}
    return run, stats


def summary(nll: np.ndarray) -> Dict:
    n = len(nll)
    mean = float(np.mean(nll))
    se = float(np.std(nll, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    ppl = math.exp(mean)
    return {"perplexity": ppl, "perplexity_stderr": ppl * se, "nll_mean": mean, "scored_tokens": n}
