"""Side-by-side benchmark against llama.cpp on the SAME random weights, in one command.

    python benchmarks/bench_llamacpp.py [--threads 2] [--dtype bfloat16] [--quant f16[,bf16,q8_0,q4_0]]
        [--prompt-tokens 128] [--new-tokens 16] [--config qwen-1.8b-chat|tiny] [--seed 0]
        [--build] [--no-build] [--sdist PATH] [--llama-cpp-dir DIR] [--cache-dir DIR]

What it does, in order (progress on stderr):

1. Builds random full-size weights exactly as ``qwen-fast bench`` does
   (``qwen_fast.loader.dummy_state_dict(cfg, dtype, seed)``) and writes them, with Qwen's real
   tokenizer, as a GGUF file for llama.cpp's ``qwen`` architecture (``write_gguf`` below;
   our own writer on top of the ``gguf`` package: ``pip install -e '.[bench]'``). The file is
   cached under ``$QWEN_FAST_CACHE`` (default ``~/.cache/qwen_fast``) as
   ``gguf/<config>-seed<seed>-<dtype>-<type>.gguf``; Q8_0/Q4_0 come from the F16 file through
   llama.cpp's ``llama-quantize``.
2. Finds llama.cpp's tools in ``$LLAMA_CPP_DIR`` (an existing build: its ``bin/``) or in
   ``<cache>/llama.cpp-build``; when they are missing it builds them there from the vendored
   llama.cpp of the llama-cpp-python sdist (``--sdist``, else ``pip download``):
   CMake Release, ``-DGGML_NATIVE=ON``, no CUDA, no curl/OpenSSL, only the targets we need, 2 jobs.
3. Runs ``llama-bench -p P -n N -t T -o json`` on each GGUF and ``qwen_fast.bench`` (prompt P,
   N new tokens, T threads) in the same run, one after the other, and prints a markdown table
   (pp tokens/s, decode tokens/s, our/llama.cpp ratios) headed by the memory read bandwidth
   qwen_fast.bench measured in the same run; JSON + markdown go to benchmarks/results/
   (llamacpp-<stamp>.json, llamacpp-latest.md).

When a part is missing (the ``gguf`` package, a compiler/CMake, the sdist, a llama.cpp tool) it
prints one line saying which part and how to get it, and exits 0.

The weights are the same, the arithmetic is not: ours computes in ``--dtype`` (bf16 by default),
llama.cpp in its own kernels for the GGUF type (F16 by default; ``bf16`` gives llama.cpp the bit-
identical bf16 weights). llama.cpp implements no dynamic NTK / logn scaling, which only matter
past seq_length (8192) tokens, far beyond these prompts.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

#: The llama-cpp-python release whose vendored llama.cpp this was written and checked against.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
#: The tools: llama-bench and llama-quantize for the benchmark; llama-simple (greedy decoding),
#: llama-debug (saves logits) and llama-tokenize for tests/test_bench_llamacpp.py.
BENCH_TARGETS = ("llama-bench", "llama-quantize")
VERIFY_TARGETS = ("llama-simple", "llama-debug", "llama-tokenize")
ALL_TARGETS = BENCH_TARGETS + VERIFY_TARGETS
#: GGUF types: written by us (f32/f16/bf16) or made from the F16 file by llama-quantize.
WRITTEN_TYPES = ("f32", "f16", "bf16")
QUANT_TYPES = ("q8_0", "q4_0")
DTYPES = ("bfloat16", "float16", "float32")


class Missing(Exception):
    """A part of the benchmark is not there: ``what`` is missing, ``how`` says how to get it."""

    def __init__(self, what: str, how: str):
        super().__init__(f"{what}; {how}")
        self.what, self.how = what, how


def progress(msg: str) -> None:
    print(f"[bench-llamacpp] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("QWEN_FAST_CACHE") or Path.home() / ".cache" / "qwen_fast")


# ---- llama.cpp: find or build the tools ------------------------------------------------------

def default_build_dir(cache: Optional[Path] = None) -> Path:
    """$LLAMA_CPP_DIR (an existing build) or <cache>/llama.cpp-build (ours)."""
    env = os.environ.get("LLAMA_CPP_DIR")
    return Path(env).expanduser() if env else (cache or cache_dir()) / "llama.cpp-build"


def find_tool(name: str, build_dir: Optional[Path] = None) -> Optional[Path]:
    """The executable ``name`` in a CMake build tree (bin/) or an install prefix, else None."""
    build_dir = build_dir or default_build_dir()
    for cand in (build_dir / "bin" / name, build_dir / name, build_dir / "build" / "bin" / name):
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    return None


def missing_tools(names: Sequence[str], build_dir: Optional[Path] = None) -> List[str]:
    return [n for n in names if find_tool(n, build_dir) is None]


def find_sdist(arg: Optional[str], cache: Path) -> Path:
    """The llama-cpp-python sdist: --sdist, one already in <cache>/sdist, or ``pip download``."""
    if arg:
        p = Path(arg).expanduser()
        if not p.is_file():
            raise Missing(f"the llama-cpp-python sdist {p} does not exist",
                          "pass --sdist PATH to a llama_cpp_python-*.tar.gz, or leave it out "
                          "to download it with pip")
        return p
    d = cache / "sdist"
    want = d / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if want.is_file():
        return want
    d.mkdir(parents=True, exist_ok=True)
    progress(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist with pip into {d}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "-d", str(d), f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0 or not want.is_file():
        raise Missing("the llama-cpp-python sdist (it vendors llama.cpp) could not be downloaded "
                      f"({r.stdout.strip().splitlines()[-1] if r.stdout.strip() else 'pip failed'})",
                      f"run `pip download --no-deps --no-binary :all: llama-cpp-python=="
                      f"{LLAMA_CPP_PYTHON_VERSION}` and pass the .tar.gz with --sdist")
    return want


def extract_sdist(sdist: Path, cache: Path) -> Path:
    """Unpack the sdist once under <cache>/llama.cpp-src/; returns its vendor/llama.cpp."""
    stem = sdist.name[:-len(".tar.gz")] if sdist.name.endswith(".tar.gz") else sdist.stem
    root = cache / "llama.cpp-src"
    src = root / stem / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").is_file():
        return src
    progress(f"unpacking {sdist.name} into {root}")
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tf:
        members = [m for m in tf.getmembers()
                   if not (m.name.startswith("/") or ".." in Path(m.name).parts)]
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(root, members=members, **kw)
    if not (src / "CMakeLists.txt").is_file():
        raise Missing(f"{sdist.name} has no vendor/llama.cpp/CMakeLists.txt",
                      "pass --sdist a llama-cpp-python source release (it vendors llama.cpp)")
    return src


def cmake_args(src: Path, build_dir: Path) -> List[str]:
    return ["cmake", "-S", str(src), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
            "-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_APP=OFF",
            "-DLLAMA_USE_PREBUILT_UI=OFF"]


def build_llama_cpp(build_dir: Path, sdist_arg: Optional[str], cache: Path,
                    targets: Sequence[str] = ALL_TARGETS, jobs: int = 2) -> float:
    """Configure and build ``targets`` (CMake Release, native CPU, no CUDA); returns seconds."""
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None and not (tool == "c++" and shutil.which("g++")):
            raise Missing(f"`{tool}` is not installed (needed to build llama.cpp)",
                          "install it (Debian: apt-get install cmake g++), or point "
                          "LLAMA_CPP_DIR at an existing llama.cpp build")
    src = extract_sdist(find_sdist(sdist_arg, cache), cache)
    t0 = time.perf_counter()
    log = build_dir.parent / (build_dir.name + ".log")
    build_dir.parent.mkdir(parents=True, exist_ok=True)
    progress(f"building llama.cpp {', '.join(targets)} from {src} into {build_dir} "
             f"(-j{jobs}, log: {log}); this takes several minutes on a small CPU")
    with open(log, "a") as lf:
        steps = [cmake_args(src, build_dir),
                 ["cmake", "--build", str(build_dir), "--config", "Release", "-j", str(jobs),
                  "--target", *targets]]
        for cmd in steps:
            lf.write("$ " + " ".join(cmd) + "\n")
            lf.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            last = 0.0
            for line in proc.stdout:
                lf.write(line)
                if line.startswith("[") and "%]" in line and time.perf_counter() - last > 15:
                    progress("  " + line.strip()[:120])     # make/ninja progress, every 15 s
                    last = time.perf_counter()
            if proc.wait() != 0:
                raise RuntimeError(f"llama.cpp build step failed ({' '.join(cmd[:3])} ...); "
                                   f"see {log}")
    secs = time.perf_counter() - t0
    record = build_dir / "qwen_fast-build.json"       # every build of this dir, oldest first
    info = json.loads(record.read_text()) if record.is_file() else {"builds": []}
    info["sdist"] = src.parent.parent.name
    info["builds"].append({"targets": list(targets), "jobs": jobs, "seconds": round(secs, 1),
                           "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    record.write_text(json.dumps(info, indent=2))
    progress(f"llama.cpp built in {secs / 60:.1f} min")
    return secs


def ensure_tools(names: Sequence[str], args) -> Path:
    """The build dir holding ``names``, building them there first when needed (and allowed):
    every tool of ALL_TARGETS, and ``names`` that are not among them (bench_prefix.py's
    llama-server)."""
    build_dir = Path(args.llama_cpp_dir).expanduser() if args.llama_cpp_dir else \
        default_build_dir(Path(args.cache_dir) if args.cache_dir else None)
    missing = missing_tools(names, build_dir)
    user_build = bool(args.llama_cpp_dir or os.environ.get("LLAMA_CPP_DIR"))
    if (missing or args.build) and not args.no_build and not user_build:
        cache = Path(args.cache_dir) if args.cache_dir else cache_dir()
        targets = tuple(dict.fromkeys((*ALL_TARGETS, *names)))
        build_llama_cpp(build_dir, args.sdist, cache, targets=targets, jobs=args.jobs)
        missing = missing_tools(names, build_dir)
    if missing:
        how = ("build them there (cmake --build <dir> --target " + " ".join(missing) + ")"
               if user_build else "run without --no-build to build them (CMake + a C++ compiler), "
               "or set LLAMA_CPP_DIR to an existing llama.cpp build")
        raise Missing(f"llama.cpp's {', '.join(missing)} not found in {build_dir}", how)
    return build_dir


# ---- GGUF ------------------------------------------------------------------------------------

def _gguf():
    try:
        import gguf
    except ImportError:
        raise Missing("the Python package `gguf` is not installed",
                      "pip install -e '.[bench]' (or: pip install gguf)") from None
    return gguf


def _byte_to_unicode() -> Dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes as themselves, the rest shifted past 255."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


_B2U = _byte_to_unicode()


def token_text(b: bytes) -> str:
    """A BPE token's bytes as GGUF/Hugging Face ``gpt2`` token text."""
    return "".join(_B2U[x] for x in b)


def _bpe_split(ranks: Dict[bytes, int], token: bytes, max_rank: int) -> List[bytes]:
    """tiktoken's merge order on ``token`` using only ranks below ``max_rank``: for a token of
    rank r this ends in exactly the two parts whose merge made it."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_i = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best):
                best, best_i = r, i
        if best is None:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


_VOCAB_CACHE: Dict[str, Tuple[List[str], List[int], List[str]]] = {}


def qwen_gguf_vocab(n_rows: int, vocab_file: Optional[Path] = None):
    """(tokens, token types, merges) of Qwen's tiktoken vocabulary as a GGUF ``gpt2`` BPE.

    Ids 0..151642 are the BPE ranks (byte-level text, NORMAL), 151643..151850 the 208 special
    tokens (CONTROL), and the padding rows up to ``n_rows`` are ``[PAD<id>]`` (UNUSED), as
    llama.cpp's converter does for Qwen. tiktoken stores no merges: each is rebuilt by running
    BPE on the token with only lower ranks, which leaves exactly the two parts merged last."""
    from qwen_fast.tokenizer import SPECIAL_START_ID, SPECIAL_TOKENS, default_vocab_path, \
        load_tiktoken_bpe

    path = Path(vocab_file or default_vocab_path())
    key = f"{path.resolve()}:{n_rows}"
    if key in _VOCAB_CACHE:
        return _VOCAB_CACHE[key]
    ranks = load_tiktoken_bpe(path)
    tokens: List[str] = [""] * SPECIAL_START_ID
    merges: List[Tuple[int, str]] = []
    for tok, rank in ranks.items():
        tokens[rank] = token_text(tok)
        if len(tok) > 1:
            parts = _bpe_split(ranks, tok, rank)
            if len(parts) != 2:
                raise ValueError(f"cannot rebuild the merge of token {rank} ({tok!r}): {parts}")
            merges.append((rank, token_text(parts[0]) + " " + token_text(parts[1])))
    merges.sort()
    types = [1] * SPECIAL_START_ID                                  # NORMAL
    tokens += list(SPECIAL_TOKENS)
    types += [3] * len(SPECIAL_TOKENS)                              # CONTROL
    for i in range(len(tokens), n_rows):
        tokens.append(f"[PAD{i}]")
        types.append(5)                                             # UNUSED
    out = (tokens, types, [m for _, m in merges])
    _VOCAB_CACHE[key] = out
    return out


def gguf_tensor_name(name: str) -> str:
    """Release tensor name -> llama.cpp's LLM_ARCH_QWEN name (spec §3.2, §8: w1 is the up
    projection, w2 the SiLU gate; c_attn is the fused Q|K|V with its bias)."""
    fixed = {"transformer.wte.weight": "token_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    parts = name.split(".", 3)
    if len(parts) != 4 or parts[:2] != ["transformer", "h"] or not parts[2].isdigit():
        raise KeyError(f"no GGUF name for {name}")
    i, rest = parts[2], parts[3]
    per_layer = {"ln_1.weight": "attn_norm.weight",
                 "attn.c_attn.weight": "attn_qkv.weight",
                 "attn.c_attn.bias": "attn_qkv.bias",
                 "attn.c_proj.weight": "attn_output.weight",
                 "ln_2.weight": "ffn_norm.weight",
                 "mlp.w1.weight": "ffn_up.weight",
                 "mlp.w2.weight": "ffn_gate.weight",
                 "mlp.c_proj.weight": "ffn_down.weight"}
    if rest not in per_layer:
        raise KeyError(f"no GGUF name for {name}")
    return f"blk.{i}.{per_layer[rest]}"


def write_gguf(path, cfg, state_dict, ftype: str = "f16", name: str = "qwen_fast dummy",
               vocab_file: Optional[Path] = None) -> Path:
    """Write ``state_dict`` (release names, any float dtype) as a llama.cpp ``qwen`` GGUF.

    Matrices are stored as ``ftype`` (f32, f16 or bf16), 1-D tensors (norms, the c_attn bias)
    as F32, as llama.cpp's converter does. Hyper-parameters as the converter writes them for
    QWenLMHeadModel: context length = max_position_embeddings, feed_forward_length =
    intermediate_size (llama.cpp halves it), rope dimension = kv_channels. Tensors are streamed
    one at a time into ``path + '.tmp'``, then renamed, so a half-written file is never used."""
    import numpy as np
    import torch

    gguf = _gguf()
    if ftype not in WRITTEN_TYPES:
        raise ValueError(f"ftype must be one of {WRITTEN_TYPES}, got {ftype!r}")
    if cfg.projection_size != cfg.hidden_size:
        raise ValueError("llama.cpp's qwen graph needs heads x kv_channels == hidden_size")
    if cfg.rotary_pct != 1.0:
        raise ValueError("llama.cpp's qwen graph ropes the whole head (rotary_pct 1.0)")
    from qwen_fast.tokenizer import EOD_ID

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    qt = gguf.GGMLQuantizationType
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[ftype]
    w = gguf.GGUFWriter(str(tmp), "qwen")
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.rotary_dim)
    w.add_head_count(cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.layer_norm_epsilon)
    w.add_rope_freq_base(cfg.rotary_emb_base)
    w.add_file_type(file_type)
    tokens, types, merges = qwen_gguf_vocab(cfg.vocab_size, vocab_file)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")      # Qwen v1's PAT_STR is the regex llama.cpp runs for "qwen2"
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(EOD_ID)        # the converter sets bos = eos = unk = <|endoftext|>
    w.add_eos_token_id(EOD_ID)
    w.add_unk_token_id(EOD_ID)

    def as_array(t: torch.Tensor):
        t = t.detach().cpu().contiguous()
        if t.dim() == 1 or ftype == "f32":
            return t.to(torch.float32).numpy()
        if ftype == "f16":
            return t.to(torch.float16).numpy()
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)   # raw bf16 bits

    order = list(state_dict)
    for n in order:
        t = state_dict[n]
        itemsize = 4 if (t.dim() == 1 or ftype == "f32") else 2
        raw = None if (t.dim() == 1 or ftype != "bf16") else qt.BF16
        np_dtype = np.float32 if itemsize == 4 else (np.float16 if raw is None else np.uint16)
        w.add_tensor_info(gguf_tensor_name(n), tuple(t.shape), np.dtype(np_dtype),
                          t.numel() * itemsize, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for n in order:
        w.write_tensor_data(as_array(state_dict[n]))
    w.close()
    os.replace(tmp, path)
    return path


def _builtin_cfg(config: str):
    if config == "tiny":
        from qwen_fast.testing import tiny_config
        return tiny_config()
    from qwen_fast.config import builtin_config
    return builtin_config(config)


def gguf_path(cache: Path, config: str, dtype: str, seed: int, ftype: str) -> Path:
    return cache / "gguf" / f"{config}-seed{seed}-{dtype}-{ftype}.gguf"


def ensure_gguf(cache: Path, config: str, dtype: str, seed: int, ftype: str,
                build_dir: Optional[Path] = None) -> Path:
    """The cached GGUF of ``qwen_fast``'s dummy weights (config, dtype, seed) as ``ftype``:
    written by us for f32/f16/bf16, quantized from the F16 file for q8_0/q4_0."""
    import torch

    path = gguf_path(cache, config, dtype, seed, ftype)
    if path.is_file():
        return path
    if ftype in QUANT_TYPES:
        src = ensure_gguf(cache, config, dtype, seed, "f16", build_dir)
        quant = find_tool("llama-quantize", build_dir)
        progress(f"llama-quantize {src.name} -> {ftype.upper()}")
        tmp = path.with_name(path.name + ".tmp")
        r = subprocess.run([str(quant), str(src), str(tmp), ftype.upper()],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"llama-quantize failed:\n{r.stdout[-2000:]}")
        os.replace(tmp, path)
        return path
    from qwen_fast.loader import dummy_state_dict

    cfg = _builtin_cfg(config)
    progress(f"building the dummy {config} weights ({dtype}, seed {seed}) and writing "
             f"{path.name}")
    t0 = time.perf_counter()
    sd = dummy_state_dict(cfg, getattr(torch, dtype), seed=seed)
    write_gguf(path, cfg, sd, ftype, name=f"qwen_fast dummy {config} seed {seed} ({dtype})")
    del sd
    progress(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in "
             f"{time.perf_counter() - t0:.0f} s")
    return path


# ---- the runs --------------------------------------------------------------------------------

def run_llama_bench(bench: Path, model: Path, threads: int, prompt: int, new: int,
                    reps: int, depth: int = 0) -> List[dict]:
    """llama-bench's pp<prompt> and tg<new> records; with depth > 0 every test also runs with
    that many tokens already in the cache (-d 0,depth), so that its decode can be taken where
    ours decodes: after the prompt."""
    cmd = [str(bench), "-m", str(model), "-p", str(prompt), "-n", str(new), "-t", str(threads),
           "-r", str(reps), "-o", "json"] + (["-d", f"0,{depth}"] if depth > 0 else [])
    progress("$ " + " ".join([bench.name] + cmd[1:]))
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({r.returncode}):\n{r.stderr[-3000:]}")
    records = json.loads(r.stdout)
    for rec in records:             # no machine paths in the results we keep
        if "model_filename" in rec:
            rec["model_filename"] = Path(rec["model_filename"]).name
    return records


def llama_rates(records: List[dict], prompt: int, new: int, depth: int = 0) -> Dict[str, float]:
    """llama-bench's mean and standard deviation of tokens/s for pp<prompt> (from an empty
    cache) and tg<new> (at `depth` cached tokens)."""
    nan = float("nan")
    pp = [x for x in records if x.get("n_prompt") == prompt and x.get("n_gen") == 0
          and x.get("n_depth", 0) == 0]
    tg = [x for x in records if x.get("n_gen") == new and x.get("n_prompt") == 0
          and x.get("n_depth", 0) == depth]
    return {"pp": pp[0]["avg_ts"] if pp else nan, "pp_std": pp[0]["stddev_ts"] if pp else nan,
            "tg": tg[0]["avg_ts"] if tg else nan, "tg_std": tg[0]["stddev_ts"] if tg else nan}


# Our weights that a GGUF type is compared with: the layers' quantization.
LAYER_QUANT = {"f16": "none", "bf16": "none", "f32": "none", "q8_0": "int8", "q4_0": "int4"}
# Our configuration for each GGUF type when --ours is not given ("layers:lm_head").
DEFAULT_OURS = {"none": "none:none", "int8": "int8:int8", "int4": "int4:int4"}


def our_configs(args, types: Sequence[str]) -> List[str]:
    """Our configurations as "layers:lm_head" quantizations (none / int8 / int4)."""
    if args.ours:
        configs = []
        for c in args.ours.split(","):
            layers, _, head = c.strip().partition(":")
            if layers not in DEFAULT_OURS or (head or "none") not in DEFAULT_OURS:
                raise SystemExit(f"--ours: {c!r} is not LAYERS[:LM_HEAD] with each of none, int8, int4")
            configs.append(f"{layers}:{head or 'none'}")
        return configs
    return list(dict.fromkeys(DEFAULT_OURS[LAYER_QUANT[t]] for t in types))


def run_ours(args, config: str = "none:none") -> dict:
    from qwen_fast import bench as qbench

    layers, head = config.split(":")
    ns = qbench.build_parser().parse_args([
        "--config", args.config, "--dtype", args.dtype, "--backend", args.backend,
        "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
        "--threads", str(args.threads), "--repeats", str(args.repeats),
        "--quant", layers, "--lm-head-quant", head])
    return qbench.run(ns)


def best_rows(rounds: List[dict], types: Sequence[str], args) -> List[dict]:
    """Table rows: for each engine, configuration and metric the best round (the least
    disturbed on a shared machine; with one round, that round). Each of our rows is compared
    with the llama.cpp type whose layers are quantized alike (int4 with Q4_0, ...)."""
    llama = {}
    for t in types:
        rates = [llama_rates(r["llama_cpp"][t], args.prompt_tokens, args.new_tokens,
                             getattr(args, "tg_depth", 0))
                 for r in rounds]
        bp = max(rates, key=lambda x: x["pp"] if x["pp"] == x["pp"] else -1)
        bt = max(rates, key=lambda x: x["tg"] if x["tg"] == x["tg"] else -1)
        llama[t] = {"engine": "llama.cpp", "type": t.upper(), "pp_tokens_per_s": bp["pp"],
                    "decode_tokens_per_s": bt["tg"], "pp_stddev": bp["pp_std"],
                    "decode_stddev": bt["tg_std"],
                    "per_round": [{"pp": x["pp"], "decode": x["tg"]} for x in rates]}
    rows = []
    for config in rounds[0]["ours"]:
        ours = [r["ours"][config]["results"][0] for r in rounds]
        layers, head = config.split(":")
        name = args.dtype if layers == "none" else f"{layers}, lm_head {args.dtype if head == 'none' else head}"
        row = {"engine": f"qwen_fast ({ours[0]['backend']})", "type": name, "config": config,
               "pp_tokens_per_s": max(o["prefill_tokens_per_s"] for o in ours),
               "decode_tokens_per_s": max(o["decode_tokens_per_s"] for o in ours),
               "weight_bytes_per_token": ours[0]["weight_bytes_per_token"],
               "per_round": [{"pp": o["prefill_tokens_per_s"], "decode": o["decode_tokens_per_s"],
                              "pct_of_read": o["pct_of_read"], "read_gb_s": o["read_gb_s"]}
                             for o in ours]}
        match = [t for t in types if LAYER_QUANT[t] == layers]
        if match:
            ref = llama[match[0]]
            row["vs"] = ref["type"]
            # Each round's pair was measured back to back: its ratio compares the engines at
            # one moment of the machine, which the best-of-rounds ratio may not.
            row["decode_ratio_per_round"] = [o["decode"] / x["decode"] if x["decode"] else None
                                             for o, x in zip(row["per_round"], ref["per_round"])]
            if ref["pp_tokens_per_s"]:
                row["ours_over_pp"] = row["pp_tokens_per_s"] / ref["pp_tokens_per_s"]
            if ref["decode_tokens_per_s"]:
                row["ours_over_tg"] = row["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
        rows.append(row)
    return rows + [llama[t] for t in types]


def llama_bytes_per_token(path: Path) -> int:
    """Bytes a llama.cpp decode token reads from a GGUF: every tensor but token_embd, of which it
    reads one row (counted)."""
    reader = _gguf().GGUFReader(str(path))
    total = 0
    for t in reader.tensors:
        n = int(t.n_bytes)
        total += n // int(t.shape[-1]) if t.name == "token_embd.weight" else n
    return total


def round_table(out: dict) -> List[dict]:
    """Per round and pair (each llama.cpp type with our configuration quantized alike, measured
    back to back): both engines' decode tokens/s, the GB/s of weights each read, and each as a
    share of the read pass qwen_fast.bench measured around our run of that round (the nearest
    one to llama-bench's run; llama.cpp's bytes: llama_bytes_per_token)."""
    rows = []
    llama_bytes = out.get("llama_bytes_per_token", {})
    for k, rnd in enumerate(out["rounds"]):
        for t, recs in rnd["llama_cpp"].items():
            match = [c for c in rnd["ours"] if c.split(":")[0] == LAYER_QUANT[t]]
            if not match:
                continue
            ours = rnd["ours"][match[0]]["results"][0]
            tg = llama_rates(recs, out["prompt_tokens"], out["new_tokens"],
                             out.get("tg_depth", 0))["tg"]
            read = ours["read_gb_s"]
            row = {"round": k + 1, "type": t.upper(), "config": match[0], "read_gb_s": read,
                   "ours_tok_s": ours["decode_tokens_per_s"], "ours_pct_of_read": ours["pct_of_read"],
                   "llama_tok_s": tg, "ratio": ours["decode_tokens_per_s"] / tg if tg else None}
            if t in llama_bytes and tg == tg:
                row["llama_pct_of_read"] = 100 * llama_bytes[t] * tg / 1e9 / read
            rows.append(row)
    return rows


def format_rounds(out: dict) -> str:
    """Every round's pair, and the median round's ratio per type."""
    rows = round_table(out)
    if not rows:
        return ""
    pct = lambda x: f"{x:.0f}%" if x is not None else "?"      # noqa: E731
    lines = ["", "Every round (ours right after llama.cpp of the same quantization; shares of the "
             "read pass measured around our run; llama.cpp's bytes: every GGUF tensor but "
             "token_embd, of which one row):", "",
             "| round | pair | read GB/s | ours tok/s | ours % of read | llama.cpp tok/s | "
             "llama.cpp % of read | ours / llama.cpp |", "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['round']} | {r['config']} vs {r['type']} | {r['read_gb_s']:.1f} | "
                     f"{r['ours_tok_s']:.2f} | {pct(r['ours_pct_of_read'])} | {r['llama_tok_s']:.2f} | "
                     f"{pct(r.get('llama_pct_of_read'))} | {r['ratio']:.2f} |")
    lines.append("")
    for t in dict.fromkeys(r["type"] for r in rows):
        ratios = sorted(r["ratio"] for r in rows if r["type"] == t and r["ratio"])
        shares = sorted(r["ours_pct_of_read"] for r in rows if r["type"] == t)
        if ratios:
            lines.append(f"- vs {t}: median round ratio {statistics.median(ratios):.2f} "
                         f"(range {ratios[0]:.2f}-{ratios[-1]:.2f}); our share of the read pass "
                         f"{shares[0]:.0f}-{shares[-1]:.0f}% (median {statistics.median(shares):.0f}%)")
    return "\n".join(lines) + "\n"


def format_table(out: dict) -> str:
    gbs = lambda xs: ", ".join(f"{x:.1f}" for x in xs)       # noqa: E731
    n = out["rounds_run"]
    lines = [f"# qwen_fast vs llama.cpp: {out['config']} random weights (seed {out['seed']}), "
             f"prompt {out['prompt_tokens']}, {out['new_tokens']} new tokens, "
             f"{out['threads']} threads",
             "",
             f"memory read {gbs(out['read_gb_s'])} GB/s, copy {gbs(out['copy_gb_s'])} GB/s "
             f"(same run, qwen_fast.bench{', per round' if n > 1 else ''}); 1-min load average "
             f"before/after{' per round' if n > 1 else ''}: "
             f"{'; '.join(f'{a}/{b}' for a, b in out['loadavg_1min'])}; llama.cpp "
             f"{out['llama_cpp']['build']}; {out['machine']}",
             "",
             f"| engine | dtype / quant | pp{out['prompt_tokens']} tok/s | decode tok/s | "
             f"ours/llama.cpp pp | ours/llama.cpp decode | decode ratio per round |",
             "|" + "---|" * 7]
    for r in out["rows"]:
        vs = f" (vs {r['vs']})" if r.get("vs") else ""
        rp = f"{r['ours_over_pp']:.2f}x{vs}" if r.get("ours_over_pp") else ""
        rt = f"{r['ours_over_tg']:.2f}x{vs}" if r.get("ours_over_tg") else ""
        pp_sd = f" ± {r['pp_stddev']:.1f}" if r.get("pp_stddev") is not None else ""
        tg_sd = f" ± {r['decode_stddev']:.2f}" if r.get("decode_stddev") is not None else ""
        per = ", ".join(f"{x:.2f}" for x in r.get("decode_ratio_per_round", []) if x)
        lines.append(f"| {r['engine']} | {r['type']} | {r['pp_tokens_per_s']:.1f}{pp_sd} | "
                     f"{r['decode_tokens_per_s']:.2f}{tg_sd} | {rp} | {rt} | {per} |")
    lines += ["", f"pp: qwen_fast = prompt tokens / time to first token (prefill + 1 sampled "
              f"token; median of {out['ours_repeats']}), llama.cpp = llama-bench pp (prompt "
              f"only; mean ± sd of {out['llama_reps']}). decode: qwen_fast = per-token decode "
              f"after the prompt (median), llama.cpp = llama-bench tg{out['new_tokens']} (mean ± "
              f"sd, " + (f"after {out['tg_depth']} cached tokens, -d" if out.get("tg_depth")
                         else "from an empty cache") + "). Ratios > 1: qwen_fast is faster."
              + (f" Best of {n} rounds per engine and metric; each llama.cpp type runs right "
                 f"before our configurations quantized alike, and the last column gives each "
                 f"round's ratio of that back-to-back pair; every round is in the JSON."
                 if n > 1 else "")]
    return "\n".join(lines) + "\n" + format_rounds(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                   help="our dtype, and the dtype the dummy weights are made in for the GGUF")
    p.add_argument("--quant", default="f16",
                   help="comma-separated GGUF types for llama.cpp: f16 (default), bf16, f32, "
                        "q8_0, q4_0")
    p.add_argument("--ours", default=None,
                   help="comma-separated LAYERS[:LM_HEAD] quantizations of our model to run "
                        "(none, int8, int4), e.g. int4:int4,int4:int8,int4:none; default: the "
                        "match of each --quant type (f16: none, q8_0: int8:int8, q4_0: int4:int4)")
    p.add_argument("--config", default="qwen-1.8b-chat",
                   help="built-in config (default qwen-1.8b-chat; 'tiny' for a smoke run)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dummy weights (ours uses 0)")
    p.add_argument("--backend", default="auto", help="our backend (qwen_fast.bench --backend)")
    p.add_argument("--repeats", type=int, default=2, help="qwen_fast.bench --repeats")
    p.add_argument("--llama-reps", type=int, default=3, help="llama-bench -r")
    p.add_argument("--tg-depth", type=int, default=None,
                   help="tokens in llama.cpp's cache when its decode is timed (llama-bench -d; "
                        "default: --prompt-tokens, where ours decodes; 0: from an empty cache, "
                        "as runs before 2026-12-05 did)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run both engines this many times, alternating, and report each one's "
                        "best round (for a shared, noisy machine)")
    p.add_argument("--build", action="store_true",
                   help="(re)build llama.cpp's tools even if they are there (incremental)")
    p.add_argument("--no-build", action="store_true", help="never build; skip if tools are missing")
    p.add_argument("--sdist", help="llama-cpp-python sdist (.tar.gz); default: pip download "
                                   f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}")
    p.add_argument("--llama-cpp-dir", help="an existing llama.cpp build (default $LLAMA_CPP_DIR, "
                                           "else <cache>/llama.cpp-build, built on first use)")
    p.add_argument("--cache-dir", help="default $QWEN_FAST_CACHE or ~/.cache/qwen_fast")
    p.add_argument("--jobs", type=int, default=2, help="build jobs (default 2)")
    p.add_argument("--results", default=str(RESULTS), help="where JSON + markdown go")
    p.add_argument("--report", metavar="JSON",
                   help="print the tables of a saved run's JSON (llama.cpp's bytes from the cached "
                        "GGUFs it names, when they are there) and exit; runs nothing")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tg_depth is None:
        args.tg_depth = args.prompt_tokens
    if args.report:
        out = json.loads(Path(args.report).read_text())
        if "llama_bytes_per_token" not in out:
            cache = Path(args.cache_dir).expanduser() if args.cache_dir else cache_dir()
            files = {t: cache / "gguf" / g["file"] for t, g in out["llama_cpp"]["gguf"].items()}
            out["llama_bytes_per_token"] = {t: llama_bytes_per_token(f) for t, f in files.items()
                                            if f.is_file()}
        print(format_table(out))
        return 0
    if args.seed != 0:
        raise SystemExit("--seed: qwen_fast.bench always uses seed 0, so the GGUF must too")
    types = [t.strip().lower() for t in args.quant.split(",") if t.strip()]
    bad = [t for t in types if t not in WRITTEN_TYPES + QUANT_TYPES]
    if bad or not types:
        raise SystemExit(f"--quant: unknown GGUF type(s) {bad}; use {WRITTEN_TYPES + QUANT_TYPES}")
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else cache_dir()
    try:
        try:
            import qwen_fast  # noqa: F401
        except ImportError as e:
            raise Missing(f"qwen_fast is not importable ({e})",
                          "pip install -e '.[bench]' in this repository") from None
        _gguf()
        build_dir = ensure_tools(BENCH_TARGETS, args)
        paths = {t: ensure_gguf(cache, args.config, args.dtype, args.seed, t, build_dir)
                 for t in types}
    except Missing as m:
        print(f"bench_llamacpp: skipped: {m.what}. To get it: {m.how}")
        return 0

    bench = find_tool("llama-bench", build_dir)
    configs = our_configs(args, types)
    rounds = []
    # Each llama.cpp type is run right before our configurations quantized alike (the machine's
    # memory bandwidth drifts over minutes: a pair measured minutes apart compares moments, not
    # engines); llama.cpp first, so that our model is not in memory meanwhile.
    order = []
    for t in types:
        order.append(("llama", t))
        order += [("ours", c) for c in configs if c.split(":")[0] == LAYER_QUANT[t]
                  and ("ours", c) not in order]
    order += [("ours", c) for c in configs if ("ours", c) not in order]
    for k in range(args.rounds):
        load_before = os.getloadavg()
        llama: Dict[str, List[dict]] = {}
        ours = {}
        for kind, what in order:
            if kind == "llama":
                llama[what] = run_llama_bench(bench, paths[what], args.threads, args.prompt_tokens,
                                              args.new_tokens, args.llama_reps, args.tg_depth)
            else:
                progress(f"round {k + 1}/{args.rounds}: qwen_fast.bench: {args.dtype} {what}, "
                         f"backend {args.backend}, {args.threads} threads")
                ours[what] = run_ours(args, what)
        ours = {c: ours[c] for c in configs}
        rounds.append({"llama_cpp": llama, "ours": ours,
                       "loadavg_1_5_15": {"before": load_before, "after": os.getloadavg()}})
    rows = best_rows(rounds, types, args)
    rec = rounds[0]["llama_cpp"][types[0]][0]
    info = {}
    info_file = build_dir / "qwen_fast-build.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
    first = [r["ours"][configs[0]] for r in rounds]
    best_ours = max(first, key=lambda o: o["results"][0]["decode_tokens_per_s"])
    out = {"config": args.config, "seed": args.seed, "dtype": args.dtype,
           "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
           "threads": args.threads, "ours_repeats": args.repeats, "llama_reps": args.llama_reps,
           "rounds_run": args.rounds, "tg_depth": args.tg_depth,
           "machine": f"{platform.machine()} {rec.get('cpu_info', platform.processor())}",
           "read_gb_s": [o["read_gb_s"] for o in first],
           "copy_gb_s": [o["copy_gb_s"] for o in first],
           "loadavg_1min": [[round(r["loadavg_1_5_15"]["before"][0], 1),
                             round(r["loadavg_1_5_15"]["after"][0], 1)] for r in rounds],
           "llama_cpp": {"build": f"{rec.get('build_commit', '?')} "
                                  f"(build {rec.get('build_number', '?')}, "
                                  f"{info.get('sdist', 'own build')})",
                         "build_info": info, "backends": rec.get("backends"),
                         "gguf": {t: {"file": p.name, "bytes": p.stat().st_size}
                                  for t, p in paths.items()}},
           "ours_machine": best_ours["machine"], "rows": rows, "rounds": rounds,
           "llama_bytes_per_token": {t: llama_bytes_per_token(p) for t, p in paths.items()}}
    md = format_table(out)
    print(md)
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (res / f"llamacpp-{stamp}.json").write_text(json.dumps(out, indent=2))
    (res / "llamacpp-latest.md").write_text(md)
    progress(f"wrote {res / f'llamacpp-{stamp}.json'} and llamacpp-latest.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
