"""llama.cpp, the runtime users already run, built from the source that the PyPI sdist of
``llama-cpp-python`` vendors, and driven from here to check and time our GGUF exports.

Built once per sdist version and machine kind (``GGML_NATIVE``: the build uses this CPU's vector
extensions) into ``$SMARTPRUNE_CACHE/llama.cpp`` (about 10 minutes on two cores; ``./run test`` and
``python -m smartprune.runtimes.llamacpp`` build it ahead). What is built: the shared libraries and
the tools ``llama-bench``, ``llama-perplexity``, ``llama-quantize`` and ``llama-tokenize``. The
Python side is the sdist's own ctypes bindings (``llama_cpp.llama_cpp``, the low-level module only,
which needs nothing beyond ``typing_extensions``) loaded over the libraries built here through
``LLAMA_CPP_LIB_PATH``: the same version as the tools, and no second compilation.

Why not ``pip install llama-cpp-python``: it compiles the same source again (with its own flags),
without the tools users time models with (``llama-bench``, ``llama-perplexity``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from smartprune.errors import SmartpruneError
from smartprune.paths import cache_dir

log = logging.getLogger(__name__)
VERSION = "0.3.36"  # llama-cpp-python, whose sdist vendors the llama.cpp source built here
TOOLS = ("llama-bench", "llama-perplexity", "llama-quantize", "llama-tokenize")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF",
               "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON")  # the build is renamed into place: relative library paths
# No AMX tiles on x86-64: with GGML_NATIVE on a CPU that lists AMX, ggml's tiled q8_0 products use them, and on a
# virtual machine that lists AMX without running it (this project's, 2026-12-08) every q8_0 model crashes
# llama.cpp (SIGSEGV / invalid opcode in libggml-cpu); AVX-512 and AVX2 stay as the CPU has them.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if os.uname().machine == "x86_64":
    CMAKE_FLAGS = (*CMAKE_FLAGS, f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}")


class RuntimeMissing(SmartpruneError):
    """llama.cpp cannot be built or found here (no compiler, no cmake, no sdist)."""


def why_not() -> str | None:
    """Why llama.cpp cannot be built here, or None."""
    for tool in ("cmake", os.environ.get("CXX", "g++"), os.environ.get("CC", "gcc")):
        if shutil.which(tool) is None:
            return f"no {tool} on PATH (llama.cpp is built from source)"
    if sys.platform != "linux":
        return f"the llama.cpp build here is written for Linux, not {sys.platform}"
    return None


def _cpu_key() -> str:
    """The CPU's vector extensions (a GGML_NATIVE build runs only where they all exist)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = os.uname().machine
    wanted = sorted(f for f in flags.split() if f.startswith(("avx", "fma", "f16c", "sse", "amx")))
    return hashlib.sha256(" ".join([*wanted, *CMAKE_FLAGS, *TOOLS]).encode()).hexdigest()[:12]


def home() -> Path:
    return cache_dir() / "llama.cpp"


def source_dir() -> Path:
    """The extracted sdist (downloaded once from PyPI with pip)."""
    return home() / f"llama_cpp_python-{VERSION}"


def build_dir() -> Path:
    return home() / f"build-{VERSION}-{_cpu_key()}"


def bin_dir() -> Path:
    return build_dir() / "bin"


def is_built() -> bool:
    return all((bin_dir() / tool).is_file() for tool in TOOLS) and (bin_dir() / "libllama.so").is_file()


def _fetch_source() -> Path:
    target = source_dir()
    if (target / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return target
    home().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home()) as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                               f"llama-cpp-python=={VERSION}", "-d", tmp], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not sdists:
            raise RuntimeMissing(f"could not download the llama-cpp-python {VERSION} sdist from PyPI: "
                                 f"{(done.stderr.strip().splitlines() or ['pip failed'])[-1]}")
        with tarfile.open(sdists[0]) as tar:
            tar.extractall(tmp, filter="data")
        os.replace(Path(tmp) / target.name, target)  # whole or not at all
    return target


def build(jobs: int | None = None) -> Path:
    """Build llama.cpp into the cache once; returns the folder of its tools and libraries. The build
    happens in a temporary folder renamed into place at the end, so a killed build leaves nothing that
    looks finished."""
    if is_built():
        return bin_dir()
    reason = why_not()
    if reason:
        raise RuntimeMissing(reason)
    src = _fetch_source() / "vendor" / "llama.cpp"
    target = build_dir()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=home()))
    jobs = jobs or os.cpu_count() or 2
    log.info("building llama.cpp (from the llama-cpp-python %s sdist) once into %s: about 10 minutes on two cores",
             VERSION, target)
    try:
        for cmd in (["cmake", "-S", str(src), "-B", str(tmp), "-G", "Ninja" if shutil.which("ninja") else
                     "Unix Makefiles", *CMAKE_FLAGS],
                    ["cmake", "--build", str(tmp), "-j", str(jobs), "--target", "llama", *TOOLS]):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
                raise RuntimeMissing(f"the llama.cpp build failed: {' | '.join(tail)}")
        if target.exists():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists() and tmp != target:
            shutil.rmtree(tmp, ignore_errors=True)
    return bin_dir()


def tool(name: str) -> Path:
    """The path of a built tool (building llama.cpp first where needed)."""
    return build() / name


def _run(cmd: list, what: str) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise RuntimeMissing(f"llama.cpp {what} failed: {tail}")
    return done


def perplexity(gguf: str | os.PathLike, text_file: str | os.PathLike, *, ctx: int = 1024, chunks: int = 32,
               threads: int = 2) -> dict:
    """``llama-perplexity`` on a raw text file: llama.cpp's own protocol (chunks of `ctx` tokens, the
    second half of each scored). Returns {"ppl", "chunks", "ctx"}."""
    import re

    done = _run([tool("llama-perplexity"), "-m", gguf, "-f", text_file, "-c", ctx, "--chunks", chunks, "-t", threads,
                 "-b", ctx], "perplexity")
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
    if not found:
        raise RuntimeMissing(f"llama-perplexity printed no estimate for {gguf}")
    return {"ppl": float(found.group(1)), "chunks": chunks, "ctx": ctx}


def tokenize(gguf: str | os.PathLike, text_file: str | os.PathLike) -> list[int]:
    """llama.cpp's token ids of a text file (``llama-tokenize``, the file's BOS rule applied)."""
    import ast

    done = _run([tool("llama-tokenize"), "-m", gguf, "-f", text_file, "--ids", "--log-disable"], "tokenize")
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def quantize(src: str | os.PathLike, out: str | os.PathLike, kind: str, threads: int = 2) -> Path:
    """``llama-quantize`` (the k-quants the gguf package cannot write, e.g. Q4_K_M)."""
    _run([tool("llama-quantize"), src, out, kind.upper(), threads], "quantize")
    return Path(out)


def convert(folder: str | os.PathLike, out: str | os.PathLike, kind: str, name: str | None = None) -> Path:
    """llama.cpp's own converter (``convert_hf_to_gguf.py`` of the same source) on a Hugging Face folder."""
    script = _fetch_source() / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    _run([sys.executable, script, folder, "--outfile", out, "--outtype", kind,
          *(("--model-name", name) if name else ())], "convert_hf_to_gguf.py")
    return Path(out)


def _watch_peak_rss(pid: int):
    """A thread that reads the process's own high-water mark (``VmHWM``) until it exits: ``ru_maxrss``
    of a child would report this large parent's peak, which Linux carries across fork and exec."""
    import threading
    import time

    def watch() -> None:
        status = Path(f"/proc/{pid}/status")
        while True:
            try:
                line = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
            except (OSError, StopIteration):
                return  # exited (or a zombie without memory): the last reading stands
            thread.bytes = max(thread.bytes, int(line.split()[1]) * 1024)
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.bytes = 0
    thread.start()
    return thread


def bench(gguf: str | os.PathLike, *, threads: int, lengths: tuple[int, ...], new_tokens: int,
          repeats: int) -> dict:
    """``llama-bench`` on one file: a prefill of each of `lengths` and greedy-equivalent decoding of
    `new_tokens` tokens, `repeats` times each, on `threads` threads. Returns the metrics in bench's
    names (``latency_b1_{n}`` seconds, ``generate_tokens_per_s``) with their spreads, the tensors'
    bytes, and the peak RSS of the llama-bench process (its own ``VmHWM``, read while it runs)."""
    import json

    cmd = [str(tool("llama-bench")), "-m", str(gguf), "-t", str(threads), "-p", ",".join(map(str, lengths)),
           "-n", str(new_tokens), "-r", str(repeats), "-o", "json"]
    with tempfile.TemporaryFile("w+") as log:  # the log to a file: a full pipe would block the child
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        peak = _watch_peak_rss(proc.pid)
        out, _ = proc.communicate()
        peak.join()
        log.seek(0)
        if proc.returncode != 0:
            raise RuntimeMissing(f"llama-bench failed on {gguf}: {(log.read().strip().splitlines() or ['?'])[-1]}")
    tests = json.loads(out)
    metrics: dict[str, float] = {}
    spreads: dict[str, dict[str, float]] = {}
    for t in tests:
        seconds = [ns / 1e9 for ns in t["samples_ns"]]
        if t["n_gen"]:
            key, values = "generate_tokens_per_s", [t["n_gen"] / x for x in seconds]
        else:
            key, values = f"latency_b1_{t['n_prompt']}", seconds
        metrics[key] = statistics.median(values)
        spreads[key] = {"min": min(values), "max": max(values)}
    return {"metrics": metrics, "spreads": spreads, "model_bytes": tests[0]["model_size"],
            "parameters": tests[0]["model_n_params"], "type": tests[0]["model_type"],
            "peak_rss_bytes": peak.bytes}


def _bindings():
    """The sdist's low-level ctypes module over the libraries built here. Its package ``__init__`` also
    imports the high-level API (which needs ``diskcache`` and more), so the package is entered without it."""
    import importlib
    import types

    if "llama_cpp" not in sys.modules:
        os.environ["LLAMA_CPP_LIB_PATH"] = str(build())
        package = types.ModuleType("llama_cpp")
        package.__path__ = [str(source_dir() / "llama_cpp")]
        sys.modules["llama_cpp"] = package
    return importlib.import_module("llama_cpp.llama_cpp")


def _probe(gguf: Path, text: str, add_special: bool, threads: int, out: Path) -> None:
    """In this process: tokenize `text` the way llama.cpp does and save the ids and every position's
    logits (one batch, no sampling) to `out` (.npz)."""
    import ctypes

    import numpy as np

    lib = _bindings()
    quiet = lib.llama_log_callback(lambda level, message, data: None)  # kept alive until the end
    lib.llama_log_set(quiet, None)
    lib.llama_backend_init()
    model = lib.llama_model_load_from_file(str(gguf).encode(), lib.llama_model_default_params())
    if not model:
        raise RuntimeMissing(f"llama.cpp could not load {gguf}")
    vocab = lib.llama_model_get_vocab(model)
    raw = text.encode()
    ids = (lib.llama_token * (len(raw) + 8))()
    n = lib.llama_tokenize(vocab, raw, len(raw), ids, len(ids), add_special, False)
    params = lib.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = max(n, 16)
    params.n_threads = params.n_threads_batch = threads
    ctx = lib.llama_init_from_model(model, params)
    batch = lib.llama_batch_init(n, 0, 1)
    for i in range(n):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = ids[i], i, 1, 1
        batch.seq_id[i][0] = 0
    batch.n_tokens = n
    if lib.llama_decode(ctx, batch) != 0:
        raise RuntimeMissing(f"llama.cpp could not evaluate {gguf}")
    width = lib.llama_vocab_n_tokens(vocab)
    logits = np.ctypeslib.as_array(ctypes.cast(lib.llama_get_logits(ctx), ctypes.POINTER(ctypes.c_float)),
                                   shape=(n, width)).copy()
    np.savez(out, ids=np.array(ids[:n], dtype=np.int64), logits=logits)
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)
    lib.llama_model_free(model)


def evaluate(gguf: str | os.PathLike, text: str, *, add_special: bool = True, threads: int = 2):
    """llama.cpp's tokens for `text` and its logits at every position, from a child process (llama.cpp
    aborts the process on some damaged files; this one stays up). Returns (ids, logits) as numpy arrays."""
    import numpy as np

    build()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "probe.npz"
        done = subprocess.run([sys.executable, "-m", __name__, "probe", str(gguf), "--threads", str(threads),
                               "--out", str(out), *(() if add_special else ("--no-special",))],
                              input=text, capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeMissing(f"llama.cpp could not evaluate {gguf}: {tail}")
        with np.load(out) as data:
            return data["ids"], data["logits"]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m smartprune.runtimes.llamacpp",
                                     description="build llama.cpp into the cache (no arguments), or probe a GGUF")
    sub = parser.add_subparsers(dest="command")
    probe = sub.add_parser("probe", help="tokens and logits of the text on standard input (.npz)")
    probe.add_argument("gguf", type=Path)
    probe.add_argument("--out", type=Path, required=True)
    probe.add_argument("--threads", type=int, default=2)
    probe.add_argument("--no-special", action="store_true", help="add no BOS/EOS even where the file asks for them")
    args = parser.parse_args(argv)
    if args.command == "probe":
        _probe(args.gguf, sys.stdin.read(), not args.no_special, args.threads, args.out)
        return 0
    return _build_main()


def _build_main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    reason = why_not()
    if reason:
        print(f"llama.cpp not built: {reason}", file=sys.stderr)
        return 0  # the tests that need it are skipped with the same reason
    try:
        print(build())
    except RuntimeMissing as exc:
        print(f"llama.cpp not built: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
