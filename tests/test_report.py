"""The report: every table, every image linked and present, regeneration commands, a Markdown twin."""

import re

from .test_cli import _one_clean_line, run


def test_report_holds_every_table_and_links_every_image(model_dirs, use_data, tmp_path, capsys):
    m = model_dirs["llama"]
    steps = [
        ["compress", m, "--recipe", "paper", "--out", tmp_path / "c", "--calib-samples", "4", "--calib-seqlen", "16"],
        ["eval", m, tmp_path / "c", "--tasks", "wikitext2,sst2", "--seqlen", "32", "--limit", "1",
         "--json", tmp_path / "e.json"],
        ["classify", m, "--task", "sst2", "--recipe", "fpp-ff", "--max-train", "8", "--ft-seqlen", "16",
         "--calib-examples", "4", "--json", tmp_path / "k.json"],
        ["bench", m, tmp_path / "c", "--repeats", "1", "--lengths", "16", "--new-tokens", "4", "--no-rss",
         "--json", tmp_path / "b.json"],
        ["sweep", m, "--method", "irc", "--rates", "0,1", "--variants", "q,k", "--limit", "1", "--seqlen", "32",
         "--calib-samples", "4", "--calib-seqlen", "16", "--json", tmp_path / "s.json"],
    ]
    for argv in steps:
        code, _, err = run(capsys, *argv)
        assert code == 0, (argv[0], err)
    runs = [tmp_path / "c", tmp_path / "e.json", tmp_path / "k.json", tmp_path / "b.json", tmp_path / "s.json"]
    code, _, err = run(capsys, "report", *runs, "--out", tmp_path / "r")
    assert code == 0, err
    page = (tmp_path / "r" / "index.html").read_text()
    for title in ("Table 3", "Table 4", "Table 5", "Table 6", "Table 8", "Sweep: irc", "Weights before and after",
                  "qualitative claims", "Key is more compressible than Query"):
        assert title in page, title
    assert page.count("Reported in the paper") == 5
    images = re.findall(r"<img src='([^']+)'", page)
    assert len(images) == 2 and all((tmp_path / "r" / i).stat().st_size > 1000 for i in images)
    assert all(not i.startswith("/") for i in images)  # relative links
    assert "smartprune sweep " in page and "smartprune compress " in page
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.count("![") == 2 and "| sst2 |" not in md.split("Table 6")[0]
    code, _, err = run(capsys, "report", tmp_path / "nope.json", "--out", tmp_path / "r2")
    assert code == 2 and "run not found" in _one_clean_line(err) and not (tmp_path / "r2").exists()


def test_the_markdown_twin_shows_run_names_literally_and_commands_run_as_written():
    import shlex

    from smartprune.reporting.report import Figure, Section, render_md, shell

    name = "evil <img src=x onerror=alert(1)> | $(rm -rf ~)"
    cmd = shell("smartprune", "compress", name, "--out", "my out")
    assert shlex.split(cmd) == ["smartprune", "compress", name, "--out", "my out"]  # no word splits, no $()
    md = render_md(f"report of {name}", [Section(f"Sweep: {name}", ours=(["model", "ppl"], [[name, "1.0"]]),
                                                 figures=[Figure("figures/a.png", f"{name} curve", cmd)])], name)
    prose = md.split("```")[0] + md.split("```")[-1]  # all but the fenced command, where HTML does not render
    assert "<img" not in prose and "&lt;img" in prose
    table_row = next(line for line in md.splitlines() if line.startswith("| evil"))
    assert table_row.count(" | ") == 1  # the name's own | is escaped: still two cells
    assert cmd in md  # inside its code block, verbatim
