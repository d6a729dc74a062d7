"""Our GGUF export in llama.cpp, beside llama.cpp's own conversion of the same folder: the tokens of
WikiText-2 test against the source tokenizer's, and llama.cpp's perplexity of each file.

For each Hugging Face folder given (default: the built-in SmolLM2-135M; add a ``compress --dense-out``
folder such as ``slim-40``'s): our writer at f32 / f16 / q8_0 / q4_0, llama.cpp's converter at f32 /
f16 / q8_0 and llama-quantize's Q4_0 / Q4_K_M of its f16 file (what a user would otherwise pick);
``llama-perplexity`` of every file on WikiText-2 test raw (llama.cpp's protocol: chunks of 1024 tokens,
the second half of each scored; --chunks, default 32), and smartprune's own perplexity of the folder
(the standard protocol: every token of each 1024-token window; same number of windows).

    python benchmarks/runtimes.py --out runs/runtimes [--model DIR ...] [--chunks 32]

Every file and measurement is kept in --out and reused when there (re-running resumes). Results:
``runtimes.json`` and ``runtimes.md`` in --out. llama.cpp is built once into the cache first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import cached  # beside this file: the benchmarks' shared helpers

from smartprune.files import write_results
from smartprune.paths import data_file
from smartprune.runtimes import llamacpp

OURS = ("f32", "f16", "q8_0", "q4_0")
THEIRS = ("f32", "f16", "q8_0")
QUANTIZED = ("q4_0", "q4_k_m")  # llama-quantize of llama.cpp's own f16 file


def files(folder: Path, name: str, out: Path) -> dict[str, Path]:
    """Every GGUF file of one model: ours and llama.cpp's, made once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smartprune.storage.gguf_writer import write_gguf

    made: dict[str, Path] = {}
    model = tokenizer = None
    for kind in OURS:
        path = made[f"ours {kind}"] = out / f"{name}-ours-{kind}.gguf"
        if not path.is_file():
            if model is None:
                model = AutoModelForCausalLM.from_pretrained(folder).eval()
                tokenizer = AutoTokenizer.from_pretrained(folder)
            write_gguf(model, path, tokenizer=tokenizer, gguf_type=kind, name=name)
    for kind in THEIRS:
        path = made[f"llama.cpp {kind}"] = out / f"{name}-theirs-{kind}.gguf"
        if not path.is_file():
            llamacpp.convert(folder, path, kind, name=name)
    for kind in QUANTIZED:
        path = made[f"llama.cpp {kind}"] = out / f"{name}-theirs-{kind}.gguf"
        if not path.is_file():
            llamacpp.quantize(made["llama.cpp f16"], path, kind)
    return made


def token_agreement(folder: Path, gguf: Path, text: Path) -> dict:
    """How llama.cpp's tokens of `text` compare with the source tokenizer's: position by position, and
    the text around the first difference."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ours = tokenizer(text.read_text())["input_ids"]
    theirs = llamacpp.tokenize(gguf, text)
    differ = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b]
    first = differ[0] if differ else None
    return {"source_tokens": len(ours), "llama_cpp_tokens": len(theirs), "identical": ours == theirs,
            "differing_positions": len(differ), "first_difference": first,
            "at_first_difference": None if first is None else {
                "source": [tokenizer.decode([i]) for i in ours[first - 2:first + 3]],
                "llama_cpp": [tokenizer.decode([i]) for i in theirs[first - 2:first + 3]]}}


def own_perplexity(folder: Path, windows: int) -> dict:
    from smartprune.evaluation import perplexity
    from smartprune.storage.sources import load_model

    loaded = load_model(str(folder))
    result = perplexity(loaded.model, loaded.tokenizer, "wikitext2", limit=windows, progress=False)
    return {"ppl": result.perplexity, "windows": result.windows}


def measure(folder: Path, name: str, out: Path, chunks: int) -> dict:
    text = data_file("wikitext-2-raw", "wiki.test.raw")
    made = files(folder, name, out)
    row = {"folder": str(folder), "own": cached(out / f"{name}-own.json", lambda: own_perplexity(folder, chunks)),
           "tokens": cached(out / f"{name}-tokens.json",
                             lambda: token_agreement(folder, made["ours f32"], text)), "files": {}}
    for label, path in made.items():
        result = cached(out / f"{path.stem}-ppl.json", lambda p=path: llamacpp.perplexity(p, text, chunks=chunks))
        row["files"][label] = {**result, "bytes": path.stat().st_size, "file": path.name}
        print(f"{name:>14} {label:<16} ppl {result['ppl']:.4f}", flush=True)
    return row


def markdown(rows: dict, chunks: int) -> str:
    lines = ["# Our GGUF export in llama.cpp", "",
             f"llama-perplexity on WikiText-2 test raw ({chunks} chunks of 1024 tokens, llama.cpp's protocol: the "
             "second half of each chunk scored); smartprune's own perplexity of the same folder on the standard "
             f"protocol ({chunks} windows of 1024, every token).", ""]
    for name, row in rows.items():
        t = row["tokens"]
        lines += [f"## {name}", "", f"smartprune (transformers, fp32): **{row['own']['ppl']:.4f}** "
                  f"({row['own']['windows']} windows). WikiText-2 test tokens: source tokenizer "
                  f"{t['source_tokens']:,}, "
                  f"llama.cpp on our f32 file {t['llama_cpp_tokens']:,}, "
                  + ("identical." if t["identical"] else f"{t['differing_positions']:,} positions differ, the first "
                     f"at token {t['first_difference']:,}: source {t['at_first_difference']['source']}, llama.cpp "
                     f"{t['at_first_difference']['llama_cpp']}."),
                  "", "| file | llama.cpp perplexity | MB |", "|---|---:|---:|"]
        lines += [f"| {label} | {f['ppl']:.4f} | {f['bytes'] / 1e6:.1f} |" for label, f in row["files"].items()]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="results and the GGUF files (reused when there)")
    p.add_argument("--model", type=Path, nargs="*", default=[], help="Hugging Face folders (default: built-in)")
    p.add_argument("--chunks", type=int, default=32, help="perplexity chunks / windows of 1024 tokens (32)")
    args = p.parse_args()
    from smartprune.storage.sources import converted_builtin

    folders = args.model or [converted_builtin("smollm2-135m")]
    args.out.mkdir(parents=True, exist_ok=True)
    llamacpp.build()
    rows = {}
    for folder in folders:
        name = "smollm2-135m" if folder == converted_builtin("smollm2-135m") else folder.name
        rows[name] = measure(folder, name, args.out, args.chunks)
    write_results(args.out, "runtimes", {"chunks": args.chunks, "rows": rows}, markdown(rows, args.chunks))
    print(markdown(rows, args.chunks))


if __name__ == "__main__":
    main()
