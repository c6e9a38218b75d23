"""End-to-end benchmark on full-size Qwen-1.8B shapes with random weights (no download):
prefill time (TTFT), decode ms/token and tokens/s, bytes read per token x tokens/s = GB/s
against the copy bandwidth measured in the same run, peak memory. Every backend is measured
in one run so the ratio between them is meaningful on a noisy machine.

    python benchmarks/bench_decode.py [--prompt-len 128] [--new-tokens 16] [--dtype bfloat16]
                                      [--backends reference,auto] [--config qwen-1.8b-chat|tiny]
"""
from __future__ import annotations

import argparse
import resource
import statistics

import torch

from harness import Row, copy_peak_gbs, machine, report
from qwen_fast import Engine
from qwen_fast.testing import tiny_config


def bytes_per_decode_token(engine) -> int:
    """Weights read for one token: every matrix but the embedding table (one row of it)."""
    m = engine.model
    total = sum(t.numel() * t.element_size() for L in m.layers for t in L.values())
    total += m.lm_head.numel() * m.lm_head.element_size() + m.ln_f.numel() * m.ln_f.element_size()
    return total + m.wte.shape[1] * m.wte.element_size()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", default="reference,auto")
    ap.add_argument("--config", default="qwen-1.8b-chat")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = tiny_config() if args.config == "tiny" else args.config
    peak = copy_peak_gbs(device)
    rows = []
    engine = None
    base_tps = None
    for backend in args.backends.split(","):
        if engine is None:
            engine = Engine.from_pretrained(load_format="dummy", config=cfg, dtype=args.dtype,
                                            device=args.device, backend=backend)
        else:   # same weights, other op table
            from qwen_fast.model import resolve_ops
            engine.model.ops, engine.model.backend = resolve_ops(backend), backend
        prompt = torch.randint(0, 151643, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
        engine.generate(prompt, max_new_tokens=2, temperature=0, ignore_eos=True)   # warm-up
        pre, dec = [], []
        for _ in range(args.repeats):
            r = engine.generate(prompt, max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
            pre.append(r.prefill_s)
            dec.append(r.decode_s / max(1, r.completion_tokens - 1))
        t_pre, t_tok = statistics.median(pre), statistics.median(dec)
        nbytes = bytes_per_decode_token(engine)
        gbs = nbytes / t_tok / 1e9
        tps = 1 / t_tok
        base_tps = base_tps or tps
        rows.append(Row("decode", backend, f"prompt {args.prompt_len} + {args.new_tokens}", args.dtype,
                        t_tok * 1e6, nbytes, gbs, 100 * gbs / peak, tps / base_tps,
                        extra={"prefill_ms": t_pre * 1e3, "prefill_tokens_per_s": args.prompt_len / t_pre,
                               "decode_tokens_per_s": tps, "ms_per_token": t_tok * 1e3}))
        print(f"{backend}: TTFT {t_pre * 1e3:.1f} ms, decode {t_tok * 1e3:.1f} ms/token = {tps:.2f} tok/s, "
              f"{gbs:.1f} GB/s ({100 * gbs / peak:.0f}% of copy peak)")
    mem = (torch.cuda.max_memory_allocated() if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    meta = dict(machine(), device=str(device), config=args.config, copy_peak_gbs=round(peak, 1),
                peak_memory_gib=round(mem / 2**30, 2),
                note="speed-up column = decode tokens/s relative to the first backend")
    report(f"decode-{device.type}", rows, meta)


if __name__ == "__main__":
    main()
