"""Build qwen_fast._C: the binding and the CPU kernels always, the CUDA kernels when nvcc is found.

A CPU-only torch has no CUDAExtension support (no CUDA_HOME, no c10/cuda headers), so the
torch-free csrc/cuda/*.cu files are compiled by our own nvcc step (BuildExt below) into object
files that are linked into the extension together with cudart_static; the binding then gets
-DQF_WITH_CUDA. The binding never includes a torch CUDA header: streams arrive as integers.

Environment:
  QWEN_FAST_CUDA        auto (default: CUDA when nvcc is found) | 0 (CPU only) | 1 (nvcc required)
  QWEN_FAST_CUDA_ARCHS  SM archs, default "80;86;89;90+PTX" (PTX of the last one lets newer GPUs
                        JIT the kernels); if unset, TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX") is honoured
  CUDA_HOME             looked at first for bin/nvcc, then /usr/local/cuda, then PATH
  MAX_JOBS              caps parallel compiler processes (as for torch's own extension builds)

Install (torch must already be installed): pip install --no-build-isolation -e .
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, library_paths

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_CUDA_ARCHS = "80;86;89;90+PTX"
OPENMP = [] if sys.platform == "darwin" else ["-fopenmp"]  # Apple clang has no -fopenmp


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def log(msg: str) -> None:
    print(f"qwen_fast build: {msg}", flush=True)


def cuda_mode() -> str:
    mode = os.environ.get("QWEN_FAST_CUDA", "auto").strip().lower() or "auto"
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"QWEN_FAST_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def _cuda_home_of(nvcc: Path) -> Path | None:
    """The toolkit root that owns `nvcc` (it may be a symlink or a wrapper script)."""
    home = nvcc.resolve().parent.parent
    if (home / "include" / "cuda_runtime_api.h").exists():
        return home
    # A wrapper script elsewhere: nvcc's own dry run names its toolkit root ("#$ TOP=...").
    try:
        dry = subprocess.run(
            [str(nvcc), "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True)
        match = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.M)
    except OSError:
        return None
    return Path(match.group(1).strip()).resolve() if match else None


def find_cuda() -> tuple[Path, Path] | None:
    """(nvcc, toolkit root) from CUDA_HOME, /usr/local/cuda or PATH, in that order, or None."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc")
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    for nvcc in candidates:
        if nvcc.is_file() and os.access(nvcc, os.X_OK):
            home = _cuda_home_of(nvcc)
            if home is not None:
                return nvcc, home
    return None


def _first_dir_with(home: Path, subdirs: list[str], name: str) -> Path:
    for sub in subdirs:
        for d in sorted(home.glob(sub)):
            if (d / name).exists():
                return d
    raise RuntimeError(f"CUDA toolkit at {home} has no {name}")


def cuda_archs() -> list[tuple[str, bool]]:
    """[(sm, embed_ptx)] from QWEN_FAST_CUDA_ARCHS, else TORCH_CUDA_ARCH_LIST, else the default."""
    raw = (os.environ.get("QWEN_FAST_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
           or DEFAULT_CUDA_ARCHS)
    archs = []
    for token in re.split(r"[;,\s]+", raw.strip()):
        if not token:
            continue
        ptx = token.upper().endswith("+PTX")
        token = token[:-4] if ptx else token
        match = re.fullmatch(r"(\d+)\.(\d)([af]?)|(\d{2,3}[af]?)", token)
        if not match:
            raise RuntimeError(
                f"cannot read CUDA arch {token!r} in {raw!r} (use e.g. 80;90 or 8.0;9.0)")
        sm = match.group(4) or match.group(1) + match.group(2) + match.group(3)
        archs.append((sm, ptx))
    if not archs:
        raise RuntimeError(f"no CUDA arch in {raw!r}")
    return archs


def nvcc_version(nvcc: Path) -> str:
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True,
                         check=True).stdout
    match = re.search(r"V(\d+\.\d+\.\d+)", out) or re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else "unknown"


def write_if_changed(path: Path, text: str) -> None:
    """Leaves the file (and its mtime, so the objects that include it) alone when unchanged."""
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class BuildExt(BuildExtension):
    """torch's BuildExtension plus a torch-free nvcc step that runs before the extension links."""

    def build_extensions(self) -> None:
        build_temp = Path(self.build_temp).resolve()
        cuda = self._configure_cuda()
        archs = [sm + ("+PTX" if ptx else "") for sm, ptx in cuda["archs"]] if cuda else []
        generated = build_temp / "qf_generated"
        write_if_changed(generated / "qf_build_config.h", "\n".join([
            "// Generated by setup.py: facts about this build, for build_info().",
            "#pragma once",
            f"#define QF_TORCH_VERSION {c_string(torch.__version__)}",
            f"#define QF_CUDA_ARCHS {c_string(';'.join(archs))}",
            f"#define QF_NVCC_VERSION {c_string(cuda['version'] if cuda else '')}",
            "",
        ]))
        for ext in self.extensions:
            ext.include_dirs.append(str(generated))
            if cuda and ext.name == "qwen_fast._C":
                objects = self._compile_cuda(cuda, build_temp / "cuda")
                ext.extra_objects.extend(str(o) for o in objects)
                ext.depends.extend(str(o) for o in objects)
                ext.include_dirs.append(str(cuda["include"]))
                ext.library_dirs.append(str(cuda["lib"]))
                ext.libraries.extend(["cudart_static", "dl", "rt", "pthread"])
                ext.extra_compile_args["cxx"].append("-DQF_WITH_CUDA")
        super().build_extensions()

    def _configure_cuda(self) -> dict | None:
        mode = cuda_mode()
        if mode == "0":
            log("QWEN_FAST_CUDA=0: building the CPU kernels only")
            return None
        found = find_cuda()
        if found is None:
            if mode == "1":
                raise RuntimeError("QWEN_FAST_CUDA=1 but nvcc was not found in CUDA_HOME, "
                                   "/usr/local/cuda or PATH")
            log("nvcc not found: building the CPU kernels only (set CUDA_HOME to add CUDA)")
            return None
        nvcc, home = found
        cuda = {
            "nvcc": nvcc,
            "home": home,
            "archs": cuda_archs(),
            "version": nvcc_version(nvcc),
            "include": _first_dir_with(home, ["include", "targets/*/include"],
                                       "cuda_runtime_api.h"),
            "lib": _first_dir_with(home, ["lib64", "lib", "targets/*/lib"], "libcudart_static.a"),
        }
        log(f"CUDA kernels with {nvcc} {cuda['version']} for sm {cuda['archs']}")
        return cuda

    def _compile_cuda(self, cuda: dict, out_dir: Path) -> list[Path]:
        sources = sorted((CSRC / "cuda").glob("*.cu"))
        headers = sorted((CSRC / "common").glob("*.h")) + sorted((CSRC / "cuda").glob("*.cuh"))
        cpus = os.cpu_count() or 1
        jobs = max(1, min(len(sources), int(os.environ.get("MAX_JOBS", cpus))))
        gencode = []
        for sm, ptx in cuda["archs"]:
            code = f"[sm_{sm},compute_{sm}]" if ptx else f"sm_{sm}"
            gencode.append(f"-gencode=arch=compute_{sm},code={code}")
        flags = [
            "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-lineinfo",
            "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
            # nvcc compiles the gencode targets of one file in parallel with this many threads.
            "--threads", str(max(1, cpus // jobs)),
            f"-I{CSRC}", "-DQF_WITH_CUDA",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            *gencode,
        ]
        if os.environ.get("CXX"):
            flags += ["-ccbin", os.environ["CXX"]]
        out_dir.mkdir(parents=True, exist_ok=True)
        newest_header = max((h.stat().st_mtime for h in headers), default=0.0)

        def compile_one(src: Path) -> Path:
            obj = out_dir / (src.stem + ".o")
            cmd = [str(cuda["nvcc"]), "-c", str(src), "-o", str(obj), *flags]
            stamp = obj.with_suffix(".cmd")
            up_to_date = (obj.exists() and stamp.exists() and stamp.read_text() == " ".join(cmd)
                          and obj.stat().st_mtime >= max(src.stat().st_mtime, newest_header))
            if not up_to_date:
                log(" ".join(cmd))
                subprocess.run(cmd, check=True)
                stamp.write_text(" ".join(cmd))
            return obj

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            return list(pool.map(compile_one, sources))


setup(
    ext_modules=[
        CppExtension(
            name="qwen_fast._C",
            sources=[rel(CSRC / "bindings.cpp"), rel(CSRC / "decode_layer.cpp")]
            + [rel(p) for p in sorted((CSRC / "ops").glob("*.cpp"))]
            + [rel(p) for p in sorted((CSRC / "cpu").glob("*.cpp"))],
            include_dirs=[str(CSRC)],
            depends=[rel(p) for p in sorted(CSRC.glob("**/*.h")) + sorted(CSRC.glob("**/*.cuh"))],
            # No -march: the CPU kernels auto-vectorise for the baseline ISA and, through
            # QF_CPU_CLONES (csrc/common/simd.h), for AVX2 and AVX-512 picked at load time.
            # -fno-trapping-math lets the vectoriser compute both sides of a select (the 16-bit
            # float conversions); it changes no result. -g0 overrides Python's -g: debug info for
            # torch's templates triples the compile time.
            extra_compile_args={"cxx": ["-O3", "-fno-trapping-math", "-g0", *OPENMP]},
            # The rpath lets `import qwen_fast._C` find libc10/libtorch before torch is imported.
            extra_link_args=[*OPENMP, *(f"-Wl,-rpath,{d}" for d in library_paths())],
        ),
        # The SIMT emulator: the CUDA kernels' own sources compiled by the host compiler
        # (csrc/simt/README.md), always built, so that CI runs them without a GPU.
        CppExtension(
            name="qwen_fast._simt",
            sources=[rel(CSRC / "simt" / "module.cpp"), rel(CSRC / "simt" / "simt.cpp")],
            include_dirs=[str(CSRC)],
            depends=[rel(p) for p in sorted(CSRC.glob("**/*.h")) + sorted(CSRC.glob("**/*.cuh"))
                     + sorted(CSRC.glob("**/*.cu"))],
            extra_compile_args={"cxx": ["-O2", "-g0", "-DQF_SIMT", "-Wno-unknown-pragmas"]},
            extra_link_args=[*(f"-Wl,-rpath,{d}" for d in library_paths())],
        ),
    ],
    cmdclass={"build_ext": BuildExt},
)
