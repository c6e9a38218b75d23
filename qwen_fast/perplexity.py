"""Perplexity of a text file, and KL divergence against a saved base run, as llama.cpp's
``llama-perplexity`` (with ``--kl-divergence-base`` / ``--kl-divergence``) reports them.

    qwen-fast perplexity --model DIR --file F [--context 512] [--stride N | --chunks] [--dtype ...]
        [--quant int4|int8] [--lm-head-quant int4|int8] [--save-logits BASE.npz]
        [--kl-base BASE.npz] [--json OUT]

Windows: the file's tokens are read in windows of ``context`` tokens, one every ``stride``
tokens (default context // 2). The first window scores all its tokens but the first; every later
one only its last ``stride`` (the others were scored with less context before), so each token
after the first is scored once, with at least context - stride tokens before it (the whole
window for the first ones). Each window is one prefill of the engine (Engine.logits). With
``--chunks`` the windows are llama-perplexity's instead: non-overlapping chunks of ``context``
tokens (the tail that fills no chunk is dropped), each scoring the tokens after its first half,
so that the two tools score the same tokens with the same context.

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


def chunk_windows(n: int, context: int) -> List[Tuple[int, int, int]]:
    """llama-perplexity's windows: the file cut into n // context non-overlapping chunks of
    context tokens, each scoring only the tokens after its first half (context // 2 + 1 ..
    context - 1), so every scored token has at least context // 2 tokens before it."""
    if n < context:
        raise RequestError.of("file", f"the text has {n} token(s); chunks of context {context} "
                                      f"need at least {context}")
    half = context // 2
    return [(c * context, (c + 1) * context, c * context + half + 1) for c in range(n // context)]


def _windows_of(n: int, context: int, stride: int, chunks: bool):
    return chunk_windows(n, context) if chunks else windows(n, context, stride)


def _digest(ids: List[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int32).tobytes()).hexdigest()


def scored_logprobs(engine, ids: List[int], wins: List[Tuple[int, int, int]],
                     progress: Optional[Callable[[int, int], None]]):
    """For each window: (log-probabilities [scored, V] in float64 over the tokenizer's ids, the
    scored tokens' ids): the one forward-and-normalize loop of evaluate and evaluate_against."""
    V = len(engine.tokenizer)
    for w, (start, end, first) in enumerate(wins):
        logits = engine.logits(ids[start:end])[:, :V]          # fp32 [end - start, V]
        # the rows predicting tokens first..end-1
        yield (torch.log_softmax(logits[first - start - 1:end - start - 1].double(), dim=-1),
               torch.tensor(ids[first:end], dtype=torch.long))
        if progress is not None:
            progress(w + 1, len(wins))


def evaluate(engine, ids: List[int], context: int = 512, stride: Optional[int] = None,
             progress: Optional[Callable[[int, int], None]] = None, top_k: int = TOP_K,
             chunks: bool = False) -> Dict:
    """NLL of every scored token and, per token, the top_k ids / log-probabilities and the
    rest's log-mass (the saved form). Returns arrays and the run's parameters. chunks: score
    as llama-perplexity does (chunk_windows; stride must be None)."""
    if not isinstance(context, int) or context < 2:
        raise RequestError.of("context", f"context must be an integer >= 2, got {context!r}")
    if context >= engine.cfg.max_context:
        raise RequestError.of("context", f"context {context} is not below the model's context "
                                         f"{engine.cfg.max_context}")
    if chunks and stride is not None:
        raise RequestError.of("stride", "chunks are non-overlapping: give no stride with them")
    stride = (context if chunks else context // 2) if stride is None else stride
    if not chunks and (not isinstance(stride, int) or not 1 <= stride <= context - 1):
        raise RequestError.of("stride", f"stride must be an integer in [1, context - 1 = "
                                        f"{context - 1}], got {stride!r}")
    nll, top_ids, top_lp, rest = [], [], [], []
    wins = _windows_of(len(ids), context, stride, chunks)
    for lp, target in scored_logprobs(engine, ids, wins, progress):
        nll.append(-lp.gather(1, target[:, None])[:, 0])
        i, v, r = top_and_rest(lp, top_k)
        top_ids.append(i.to(torch.int32))
        top_lp.append(v.float())
        rest.append(r.float())
    return {"nll": torch.cat(nll).double().numpy(), "top_ids": torch.cat(top_ids).numpy(),
            "top_logprobs": torch.cat(top_lp).numpy(), "rest_logprob": torch.cat(rest).numpy(),
            "context": context, "stride": stride, "chunks": chunks, "digest": _digest(ids),
            "tokens": len(ids)}


def save_logits(path, run: Dict) -> None:
    np.savez_compressed(path, format=FORMAT, top_ids=run["top_ids"], top_logprobs=run["top_logprobs"],
                        rest_logprob=run["rest_logprob"], nll=run["nll"],
                        meta=json.dumps({k: run[k] for k in ("context", "stride", "chunks", "digest", "tokens")}))


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


def _rest_logmass(lp_sel: torch.Tensor) -> torch.Tensor:
    """log of the probability outside the ids whose log-probabilities are lp_sel [n, k]."""
    return torch.log1p(-lp_sel.exp().sum(-1).clamp(max=1 - 1e-15))


def top_and_rest(lp: torch.Tensor, k: int = TOP_K):
    """(ids [n, k], their log-probabilities, log of the rest's mass [n]) of log-probs lp [n, V]:
    the saved form of a token's distribution."""
    v, i = torch.topk(lp, min(k, lp.shape[1]), dim=-1)
    return i, v, _rest_logmass(v)


def kl_coarse(base_ids: torch.Tensor, base_lp: torch.Tensor, base_rest: torch.Tensor,
              lp: torch.Tensor) -> torch.Tensor:
    """Per token, KL(base || run) of the two distributions coarsened to the base's top ids plus
    the rest (a lower bound of the full KL): base_ids / base_lp [n, k], base_rest [n] (log of
    the mass outside them), lp [n, V] the run's log-probabilities."""
    q = lp.gather(1, base_ids)
    q_rest = _rest_logmass(q)
    kl = (base_lp.exp() * (base_lp - q)).sum(-1) + base_rest.exp() * (base_rest - q_rest)
    return kl.clamp(min=0)


def kl_full(base_lp: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """Per token, the exact KL(base || run) over the whole vocabulary (both [n, V] log-probs)."""
    return (base_lp.exp() * (base_lp - lp)).sum(-1).clamp(min=0)


def evaluate_against(engine, ids: List[int], base: Dict,
                     progress: Optional[Callable[[int, int], None]] = None) -> Tuple[Dict, Dict]:
    """evaluate() and, per scored token, the run's log-probabilities of the base's top ids (for
    the KL on the base's support). Returns (run, kl stats)."""
    context, stride = int(base["context"]), int(base["stride"])
    chunks = bool(base.get("chunks", False))
    if _digest(ids) != base["digest"]:
        raise RequestError.of("kl_base", "the base run was made from other tokens (a different "
                                         "text or tokenizer); use the same --file")
    base_ids = torch.from_numpy(base["top_ids"].astype(np.int64))
    base_lp = torch.from_numpy(base["top_logprobs"].astype(np.float64))
    base_rest = torch.from_numpy(base["rest_logprob"].astype(np.float64))
    nll, kls, agree, row = [], [], [], 0
    wins = _windows_of(len(ids), context, stride, chunks)
    for lp, target in scored_logprobs(engine, ids, wins, progress):
        m = lp.shape[0]
        if row + m > base_ids.shape[0]:
            break                                              # reported below
        bi, bl, br = base_ids[row:row + m], base_lp[row:row + m], base_rest[row:row + m]
        nll.append(-lp.gather(1, target[:, None])[:, 0])
        kls.append(kl_coarse(bi, bl, br, lp))
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
    run = {"nll": nll_t.numpy(), "context": context, "stride": stride, "chunks": chunks}
    return run, stats


def summary(nll: np.ndarray) -> Dict:
    n = len(nll)
    mean = float(np.mean(nll))
    se = float(np.std(nll, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    ppl = math.exp(mean)
    return {"perplexity": ppl, "perplexity_stderr": ppl * se, "nll_mean": mean, "scored_tokens": n}
