"""lm-eval's `local-completions` against `qwen-fast serve`: a small local multiple-choice task
(loglikelihood requests: echo, logprobs, a batch of prompts) and a generation task, with lm-eval's
remote tokenizer (/tokenizer_info, /tokenize, /detokenize); then every loglikelihood lm-eval
computed is checked against Engine.prompt_logprobs on the same tokens.

    pip install "lm_eval[api]"          # not a dependency of the project (large)
    python benchmarks/lmeval_check.py [--model DIR] [--batch-size 2] [--concurrency 2]

Without --model it writes a tiny random-weight checkpoint (the scores mean nothing; the point is
the protocol and the numbers matching). Prints lm-eval's table and the largest difference.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

QUESTIONS = [
    ("What colour is the sky on a clear day?", ["blue", "green", "red", "black"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten", "four"], 1),
    ("Which is the largest planet?", ["Mars", "Venus", "Jupiter", "Mercury"], 2),
    ("What is 2 + 2?", ["3", "5", "22", "4"], 3),
    ("Which animal barks?", ["dog", "cat", "fish", "bird"], 0),
    ("Water freezes at how many degrees Celsius?", ["100", "0", "50", "-20"], 1),
    ("Which is a fruit?", ["carrot", "potato", "apple", "onion"], 2),
    ("What do bees make?", ["milk", "silk", "wax only", "honey"], 3),
]
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {kind}
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
{extra}"""
MC = """doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
"""
GEN = """doc_to_target: "{{choices[answer]}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint directory (default: a tiny random one)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    lm_eval = shutil.which("lm_eval") or str(Path(sys.executable).with_name("lm_eval"))
    if not Path(lm_eval).exists():
        print('lm_eval is not installed: pip install "lm_eval[api]"', file=sys.stderr)
        return 2
    import torch
    from qwen_fast import Engine
    from qwen_fast.server import BackgroundServer, create_app
    from qwen_fast.testing import tiny_config, write_checkpoint

    work = Path(tempfile.mkdtemp(prefix="qf-lmeval-"))
    model = args.model or str(write_checkpoint(work / "Qwen-tiny-Chat", tiny_config(),
                                               dtype=torch.bfloat16, shards=1))
    data = work / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                            for q, c, a in QUESTIONS))
    (work / "qf_mc.yaml").write_text(TASK.format(name="qf_mc", data=data, kind="multiple_choice",
                                                 extra=MC))
    (work / "qf_gen.yaml").write_text(TASK.format(name="qf_gen", data=data, kind="generate_until",
                                                  extra=GEN))
    engine = Engine.from_pretrained(model, backend="reference" if not args.model else "auto")
    name = Path(model).name
    with BackgroundServer(create_app(engine, model_name=name), port=args.port) as srv:
        env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
        cmd = [lm_eval, "--model", "local-completions", "--model_args",
               f"model={name},base_url={srv.url}/v1/completions,num_concurrent={args.concurrency},"
               "max_retries=1,tokenized_requests=True,tokenizer_backend=remote",
               "--batch_size", str(args.batch_size), "--tasks", "qf_mc,qf_gen",
               "--include_path", str(work), "--log_samples", "--output_path", str(work / "out")]
        print("$", " ".join(cmd), flush=True)
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        table = [line for line in p.stdout.splitlines() if line.startswith("|")]
        print("\n".join(table) or p.stdout[-3000:] + p.stderr[-3000:])
        if p.returncode != 0:
            return p.returncode
    worst, n = 0.0, 0
    for line in open(glob.glob(str(work / "out" / "*" / "samples_qf_mc_*.jsonl"))[0]):
        d = json.loads(line)
        for a, resp in zip(d["arguments"].values(), d["resps"]):
            ctx = engine.tokenizer.encode(a["arg_0"])
            cont = engine.tokenizer.encode(a["arg_1"])
            lps = engine.prompt_logprobs(ctx + cont)
            ll = sum(x.logprob for x in lps[len(ctx):])
            worst = max(worst, abs(ll - float(resp[0][0])))
            n += 1
    print(f"{n} loglikelihoods from lm-eval; largest |lm-eval - Engine.prompt_logprobs| = {worst:.3g}")
    engine.close()
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
