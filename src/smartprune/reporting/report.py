"""`smartprune report RUN ... --out DIR`: one HTML page (and a Markdown twin) from measured runs.

A RUN is a JSON file written by ``eval``, ``classify``, ``compare``, ``bench`` or ``sweep`` (``--json``),
or a folder written by ``compress --out`` (its ``report.json``; its weights are drawn against the
dense model it came from). The page holds the paper's Tables 3, 4, 5, 6 and 8 filled with the
measured numbers, the paper's own numbers beside them labelled as reported, the sweep curves and
weight pictures as PNG files in ``figures/`` (linked relatively), and under every figure the command
that regenerates it.
"""

from __future__ import annotations

import html
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from smartprune.errors import DataError
from smartprune.files import atomic_dir, read_json
from smartprune.reporting import paper

Table = tuple[list[str], list[list[str]]]


@dataclass
class Figure:
    file: str  # relative to the report folder
    caption: str
    command: str


@dataclass
class Section:
    title: str
    ours: Table | None = None
    reported: Table | None = None
    figures: list[Figure] = field(default_factory=list)
    note: str = ""


def _kind(data: dict) -> str:
    if "settings_key" in data and "points" in data:
        return "sweep"
    if "by_model" in data:
        return "eval"
    if "machine" in data and "models" in data:
        return "bench"
    if "training" in data and "dense" in data and "compressed" in data:
        return "classify"
    if "rows" in data and "settings" in data:
        return "compare"
    if "groups" in data and "overall" in data:
        return "compress"
    if "recovery" in data:  # a retrained model without a compression report (e.g. the dense fine-tuned one)
        return "recover"
    return "unknown"


def load_runs(paths: list[str | Path]) -> list[tuple[str, Path, dict]]:
    """(kind, path, data) of each RUN; a compressed-model folder stands for its report.json."""
    runs = []
    for p in map(Path, paths):
        file = p / "report.json" if p.is_dir() else p
        if not file.is_file():
            raise DataError(f"run not found: {p} (expected a --json file or a compress --out folder)")
        data = read_json(file, "run", DataError)
        kind = _kind(data)
        if kind == "unknown":
            raise DataError(f"{file} is not a smartprune run (eval, classify, compare, bench, sweep, compress or "
                            "recover)")
        runs.append((kind, p, data))
    return runs


def _f(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:,.{digits}f}"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


# ---------------------------------------------------------------------------------------- tables
def table4(runs) -> Section:
    sec = Section("Table 4: parameters before and after compression",
                  reported=(["group", "before", "after", "C%UB", "T%"],
                            [[g, _f(b, 0), _f(a, 0), c, t] for g, b, a, c, t in paper.TABLE4]))
    rows = []
    for _, path, data in (r for r in runs if r[0] == "compress"):
        label = f"{data.get('model', path)} / {data.get('recipe', '')}"
        for name, g in data["groups"].items():
            rows.append([label, name, _f(g["before"], 0), _f(g["after"], 0), _pct(g["c_ub"]), _pct(g["t"])])
        o = data["overall"]
        rows.append([label, "overall", _f(o["params_before"], 0), _f(o["params_after"], 0), "", _pct(o["compression"])])
    if rows:
        sec.ours = (["model / recipe", "group", "before", "after", "C%UB", "T%"], rows)
    return sec


def _eval_models(runs):
    """(model, {task: result}) of every model of every eval run."""
    for _, _, data in (r for r in runs if r[0] == "eval"):
        yield from data["by_model"].items()


def table5(runs) -> Section:
    sec = Section("Table 5: perplexity (WikiText-2, WikiText-103, PTB test sets)",
                  reported=(["model (GPT-2, reported)", "WikiText-2", "WikiText-103", "PTB"],
                            [[m, *map(_f, v)] for m, *v in paper.TABLE5]))
    rows = []
    for model, results in _eval_models(runs):
        if not any(t in results for t in ("wikitext2", "wikitext103", "ptb")):
            continue
        cells = []
        for t in ("wikitext2", "wikitext103", "ptb"):
            r = results.get(t)
            cells.append("-" if r is None else f"{r['perplexity']:,.2f} ({r['windows']} windows)")
        rows.append([model, *cells])
    if rows:
        sec.ours = (["model", "WikiText-2", "WikiText-103", "PTB"], rows)
    return sec


def lm_eval_section(runs) -> Section | None:
    """Every lm-evaluation-harness task of every eval run: one row per model, task and metric."""
    from smartprune.evaluation.lm_eval_tasks import is_lm_eval, shown

    rows = [[model, task.removeprefix("lm-eval:"), metric, _f(result[metric], 4)]
            for model, results in _eval_models(runs) for task, result in results.items() if is_lm_eval(task)
            for metric in shown(result)]
    if not rows:
        return None
    return Section("lm-evaluation-harness tasks", ours=(["model", "task", "metric", "value"], rows),
                   note="lm-eval's own task definitions, run on each model as smartprune loaded it "
                        "(`smartprune eval --tasks lm-eval:TASK`).")


def table6(runs) -> Section:
    tasks = paper.TABLE6_TASKS
    sec = Section("Table 6: text classification accuracy (%)",
                  reported=(["model (GPT-2, reported)", *tasks], [[m, *map(_f, v)] for m, *v in paper.TABLE6]))
    rows = []
    for model, results in _eval_models(runs):
        cls = {t: results[t] for t in tasks if t in results}
        if not cls:
            continue
        mode = next((r.get("mode") for r in cls.values() if r.get("mode")), "")
        rows.append([f"{model} ({mode})"] + [
            "-" if t not in cls else ("n/a" if cls[t].get("available") is False else _f(100 * cls[t]["accuracy"], 1))
            for t in tasks])
    for _, _, data in (r for r in runs if r[0] == "classify"):
        for label, res in (("fine-tuned", data["dense"]), (f"fine-tuned, then {data['recipe']}", data["compressed"])):
            rows.append([f"{data['model']} ({label})"] + [_f(100 * res["accuracy"], 1) if t == data["task"] else "-"
                                                          for t in tasks])
    if rows:
        sec.ours = (["model", *tasks], rows)
    sec.note = "Ours: dev sets (GLUE test labels are not public); n/a = no data here for that mode."
    return sec


def table3(runs) -> Section:
    theirs = [[m, c, _f(acc), *(_f(x, 3) for x in rest)] for m, c, acc, *rest in paper.TABLE3]
    sec = Section("Table 3: each method's effect on a classifier",
                  reported=(["method (GPT-2, reported)", "compression", "accuracy %", "loss", "F1", "recall",
                             "precision"], theirs))
    rows = []
    for _, _, data in (r for r in runs if r[0] == "classify"):
        for label, res in (("fine-tuned", data["dense"]), (data["recipe"], data["compressed"])):
            comp = 0.0 if label == "fine-tuned" else data["report"]["overall"]["compression"]
            rows.append([f"{data['task']}: {label}", _pct(comp), _f(100 * res["accuracy"]), _f(res["loss"], 3),
                         _f(res["f1_weighted"], 3), _f(res["recall"], 3), _f(res["precision"], 3)])
    if rows:
        sec.ours = (["run", "compression", "accuracy %", "loss", "F1 (weighted)", "recall", "precision"], rows)
    return sec


def table8(runs) -> Section:
    sec = Section("Table 8: latency, speed-up, throughput",
                  reported=(["model (GPT-2 on GPU, reported)", "compression", "latency", "speed-up",
                             "throughput (seq/s)"], [list(r) for r in paper.TABLE8]))
    rows = []
    for _, _, data in (r for r in runs if r[0] == "bench"):
        for m in data["models"]:
            lat = next((k for k in m["metrics"] if k.startswith("latency_b1_512")), None) or \
                next(k for k in m["metrics"] if k.startswith("latency_b1_"))
            rows.append([m["name"], _f(m["size_bytes"] / 1e6, 1) + " MB", f"{1000 * m['metrics'][lat]:.1f} ms ({lat})",
                         f"{1 / m['ratios'][lat]:.2f}x", _f(m["metrics"]["throughput_seq_per_s"], 2),
                         _f(m["metrics"]["generate_tokens_per_s"], 1)])
        threads = data["machine"].get("threads")
        sec.note = f"Ours: {data['machine'].get('cpu', '')}, {threads} thread{'' if threads == 1 else 's'} (CPU)."
    if rows:
        sec.ours = (["model", "size on disk", "latency (batch 1)", "speed-up", "throughput (seq/s)",
                     "generation tokens/s"], rows)
    return sec


def comparison(runs) -> Section | None:
    rows = []
    for _, _, data in (r for r in runs if r[0] == "compare"):
        for r in data["rows"]:
            rows.append([r["method"], str(r["sparsity"]), _pct(r["compression"]),
                         *[_f(r["perplexity"].get(t)) for t in data["settings"]["tasks"]]])
        tasks = data["settings"]["tasks"]
    if not rows:
        return None
    return Section("Peer methods on equal terms (smartprune compare)", ours=(["method", "sparsity", "compression",
                                                                             *tasks], rows))


RECOVERY_NOTE = ("Retraining after compression: every number above is before retraining unless marked "
                 "recovered. Budgets, the GPU table and perplexity against tokens seen: docs/recovery-results.md.")


def recovery_section(runs) -> Section | None:
    """Compressed folders that were retrained (report.json with a recovery section), and compare rows
    retrained with an equal budget."""
    rows = []
    for _, path, data in (r for r in runs if r[0] in ("compress", "recover") and "recovery" in r[2]):
        rec = data["recovery"]
        rows.append([str(path), rec["text"], f"{rec['tokens']:,}", f"{rec['seconds']:.0f}",
                     _f(rec["perplexity_before"]), _f(rec["perplexity_after"]), "yes" if rec["structure"]["kept"]
                     else "NO"])
    for _, _, data in (r for r in runs if r[0] == "compare"):
        for r in (r for r in data["rows"] if "recovered" in r):
            rec = r["recovered"]
            before = "; ".join(f"{t} {_f(v)}" for t, v in r["perplexity"].items())
            after = "; ".join(f"{t} {_f(v)}" for t, v in rec["perplexity"].items())
            rows.append([f"{r['method']} {r['sparsity']}", "wikitext2", f"{rec['tokens']:,}", f"{rec['seconds']:.0f}",
                         before, after, "yes" if rec["structure_kept"] else "NO"])
    if not rows:
        return None
    return Section("Retraining after compression (recover)", ours=(
        ["model", "text", "tokens", "seconds", "perplexity before", "perplexity after", "structure kept"], rows),
        note=RECOVERY_NOTE)


def claims_section(runs) -> Section | None:
    from smartprune.reporting.claims import check_claims

    sweeps = [data for kind, _, data in runs if kind == "sweep"]
    if not sweeps:
        return None
    rows = [[c.claim, c.verdict, c.evidence, f"Sweep: {c.sweep}"] for c in check_claims(sweeps)]
    return Section("The paper's qualitative claims, checked on these sweeps",
                   ours=(["claim", "verdict", "evidence (first task of the sweep)", "figure"], rows),
                   note="A comparison holds when the favoured variant is better at every rate both were "
                        "measured at; perplexity lower is better, accuracy higher.")


# --------------------------------------------------------------------------------------- figures
def sweep_figures(runs, fig_dir: Path, out: Path) -> list[Section]:
    from smartprune.reporting.figures import curve_figure, save

    sections = []
    for i, (_, path, data) in enumerate(r for r in runs if r[0] == "sweep"):
        s = data["settings"]
        variants = ",".join(v for v in s["variants"] if v)
        cmd = shell("smartprune", "sweep", s["model"], "--method", s["method"], "--rates",
                    ",".join(f"{r:g}" for r in s["rates"]), *(["--variants", variants] if variants else []),
                    "--tasks", ",".join(s["tasks"]), *(["--limit", s["limit"]] if s.get("limit") else []),
                    "--json", path)
        sec = Section(f"Sweep: {s['method']}" + (f" ({variants})" if variants else ""))
        for task in s["tasks"]:
            name = f"sweep{i}-{s['method'].replace('+', '-')}-{task}.png"
            save(curve_figure(data, task), fig_dir / name)
            sec.figures.append(Figure(f"figures/{name}", f"{s['method']}: {task} against compression rate",
                                      f"{cmd}\n{shell('smartprune', 'report', path, '--out', out)}"))
        from smartprune.runs.sweep import summary_rows

        sec.ours = summary_rows(data)
        sections.append(sec)
    return sections


def weight_figures(runs, fig_dir: Path, out: Path, block: int) -> list[Section]:
    from smartprune.reporting.figures import layer_weights, save, weight_figure
    from smartprune.storage.load import load
    from smartprune.storage.sources import load_model

    sections = []
    for i, (_, path, data) in enumerate(r for r in runs if r[0] == "compress" and r[1].is_dir()):
        before = layer_weights(load_model(data["model"]).model, block)
        after = layer_weights(load(path, structured=False), block)
        name = f"weights{i}-block{block}.png"
        save(weight_figure(before, after, f"{data['model']}, recipe {data['recipe']}, block {block}"), fig_dir / name)
        cmd = shell("smartprune", "compress", data["model"], "--recipe", data["recipe"], "--out", path) + "\n" + \
            shell("smartprune", "report", path, "--out", out, "--block", block)
        sections.append(Section(f"Weights before and after ({data['recipe']}, block {block})",
                                figures=[Figure(f"figures/{name}", "Q, K, V, feed-forward and embedding weights; "
                                                "before and after share one colour scale", cmd)]))
    return sections


def frontier_figures(runs, fig_dir: Path, out: Path) -> list[Section]:
    """The quality-vs-running-cost frontier of each ``compare --measure`` run."""
    from smartprune.reporting.figures import frontier_figure, save
    from smartprune.runs.cost import cost_table

    sections = []
    for i, (_, path, data) in enumerate(r for r in runs if r[0] == "compare" and any("running" in x
                                                                                      for x in r[2]["rows"])):
        name = f"frontier{i}.png"
        save(frontier_figure(data), fig_dir / name)
        s = data["settings"]
        cmd = shell("smartprune", "compare", s["model"], "--methods", ",".join(s["methods"]), "--measure",
                    ",".join(s["measure"]), "--json", path) + "\n" + shell("smartprune", "report", path, "--out", out)
        lines = cost_table(data["rows"], s.get("measure_length", 512)).splitlines()
        table = ([c.strip() for c in lines[0].strip("|").split("|")],
                 [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]])
        sections.append(Section(f"Quality against running cost ({s['model']})", ours=table, figures=[
            Figure(f"figures/{name}", "perplexity against decoding speed and bytes held in memory; dense: the star; "
                   "circles: held as plain dense matrices, squares: held packed", cmd)]))
    return sections


# ------------------------------------------------------------------------------------- rendering
def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in t[1])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def shell(*argv) -> str:
    """A command line that a shell runs as these arguments, whatever a model name or path holds."""
    return shlex.join(str(a) for a in argv)


def _md(text: str) -> str:
    """Text from a run (model names, paths) as Markdown shows it literally: no HTML, no table breaks."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    lines = ["| " + " | ".join(map(_md, t[0])) + " |", "|" + "---|" * len(t[0])]
    lines += ["| " + " | ".join(map(_md, row)) + " |" for row in t[1]]
    return "\n".join(lines)


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;"
         "margin:.5em 0 1.5em}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}"
         "td:first-child,th:first-child{text-align:left}.reported{color:#7a4a00}pre{background:#f4f4f4;padding:6px;"
         "white-space:pre-wrap}img{max-width:100%;border:1px solid #ddd}")


def render_html(title: str, sections: list[Section], intro: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>"]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.ours:
            parts.append("<h3>Measured here</h3>" + _html_table(s.ours))
        if s.reported:
            parts.append("<h3 class='reported'>Reported in the paper (not measured here)</h3><div class='reported'>"
                         + _html_table(s.reported) + "</div>")
        if s.note:
            parts.append(f"<p>{html.escape(s.note)}</p>")
        for f in s.figures:
            parts.append(f"<figure><img src='{html.escape(f.file)}' alt='{html.escape(f.caption)}'>"
                         f"<figcaption>{html.escape(f.caption)}</figcaption></figure>"
                         f"<p>Regenerate:</p><pre>{html.escape(f.command)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_md(title: str, sections: list[Section], intro: str) -> str:
    parts = [f"# {_md(title)}", "", _md(intro), ""]
    for s in sections:
        parts += [f"## {_md(s.title)}", ""]
        if s.ours:
            parts += ["Measured here:", "", _md_table(s.ours), ""]
        if s.reported:
            parts += ["Reported in the paper (not measured here):", "", _md_table(s.reported), ""]
        if s.note:
            parts += [_md(s.note), ""]
        for f in s.figures:  # the command stays raw inside its code block, where Markdown shows it as is
            parts += [f"![{_md(f.caption)}]({f.file})", "", "Regenerate:", "", "```", f.command, "```", ""]
    return "\n".join(parts)


def write_report(paths: list[str | Path], out: str | Path, *, block: int = 0, overwrite: bool = False,
                 title: str = "smartprune reproduction report") -> Path:
    """Build the report folder `out` (index.html, report.md, figures/)."""
    out = Path(out)
    runs = load_runs(paths)
    intro = ("Measured numbers from the runs " + ", ".join(str(p) for p in paths) + ". Tables marked "
             "'reported' copy the paper (GPT-2 124M, its own setup) and were not measured here.")
    with atomic_dir(out, overwrite) as tmp:
        fig_dir = tmp / "figures"
        fig_dir.mkdir()
        sections = [table3(runs), table4(runs), table5(runs), table6(runs), table8(runs)]
        extra = [s for s in (lm_eval_section(runs), comparison(runs), recovery_section(runs), claims_section(runs))
                 if s]
        sections += extra + frontier_figures(runs, fig_dir, out) + sweep_figures(runs, fig_dir, out)
        sections += weight_figures(runs, fig_dir, out, block)
        (tmp / "index.html").write_text(render_html(title, sections, intro))
        (tmp / "report.md").write_text(render_md(title, sections, intro))
    return out
