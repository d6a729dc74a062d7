"""lm-evaluation-harness tasks on smartprune-loaded models: the numbers of lm-eval's own CLI on the
`--dense-out` export, in both residencies; unknown tasks, hub-only data and a missing include folder
refused in one line, before a model loads."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")

from smartprune.evaluation import lm_eval_tasks

from .test_cli import _one_clean_line, run

QUESTIONS = [("The capital of France is", [" Paris", " Rome", " a banana"], 0),
             ("Two plus two equals", [" four", " seven", " the sky"], 0),
             ("The opposite of hot is", [" loud", " cold", " green"], 1),
             ("Water freezes at zero degrees", [" Celsius", " Kelvin", " dollars"], 0),
             ("A week has seven", [" days", " wheels", " oceans"], 0),
             ("The sun rises in the", [" east", " drawer", " soup"], 0)]
TEXTS = ["The quick brown fox jumps over the lazy dog. It was a bright cold day in April.",
         "Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about a little.",
         "It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want."]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    """A multiple-choice task and a rolling-loglikelihood task over local JSON files, as lm-eval YAMLs
    (one folder for the module: lm-eval indexes its tasks once per folder, about 20 s)."""
    d = tmp_path_factory.mktemp("tasks")
    (d / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                        for q, c, a in QUESTIONS))
    (d / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    common = f"dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {d}/"
    (d / "sp_mc.yaml").write_text(f"task: sp_mc\n{common}mc.jsonl\noutput_type: multiple_choice\n"
                                  "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
                                  "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (d / "sp_rolling.yaml").write_text(f"task: sp_rolling\n{common}text.jsonl\noutput_type: loglikelihood_rolling\n"
                                       "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
                                       "  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    return d


METRICS = {"sp_mc": ("acc", "acc_norm"), "sp_rolling": ("word_perplexity", "bits_per_byte")}


def test_lm_eval_tasks_on_a_compressed_model_equal_lm_evals_own_cli_on_its_export(model_dirs, use_data, tasks_dir,
                                                                                    tmp_path, capsys):
    out, dense = tmp_path / "c", tmp_path / "d"
    code, _, err = run(capsys, "compress", model_dirs["llama"], "--recipe", "fpp-ff", "--out", out, "--dense-out",
                       dense, "--calib-samples", "4", "--calib-seqlen", "16")
    assert code == 0, err
    ours = {}
    for resident in ("dense", "compact"):
        code, stdout, err = run(capsys, "eval", out, "--tasks", "lm-eval:sp_mc,sp_rolling", "--lm-eval-include",
                                tasks_dir, "--resident", resident, "--json", tmp_path / f"{resident}.json")
        assert code == 0, err
        assert "| lm-eval:sp_rolling | bits_per_byte |" in stdout
        ours[resident] = json.loads((tmp_path / f"{resident}.json").read_text())["results"]
    done = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                           f"pretrained={dense},dtype=float32", "--tasks", "sp_mc,sp_rolling", "--include_path",
                           str(tasks_dir), "--device", "cpu", "--batch_size", "8", "--output_path",
                           str(tmp_path / "theirs")], capture_output=True, text=True,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = json.loads(next((tmp_path / "theirs").rglob("results_*.json")).read_text())["results"]
    for task, metrics in METRICS.items():
        for m in metrics:
            want = theirs[task][f"{m},none"]
            for resident in ("dense", "compact"):
                assert ours[resident][f"lm-eval:{task}"][m] == pytest.approx(want, rel=1e-4, abs=1e-6), (task, m)
    assert ours["dense"]["lm-eval:sp_mc"]["lm_eval"]["n_samples"]["effective"] == len(QUESTIONS)
    code, _, err = run(capsys, "report", tmp_path / "compact.json", "--out", tmp_path / "report")
    assert code == 0, err
    page = (tmp_path / "report" / "report.md").read_text()
    assert "lm-evaluation-harness tasks" in page and "| sp_rolling | bits_per_byte |" in page


@pytest.mark.parametrize("tasks, include, message", [
    ("lm-eval:sp_mcc", True, "unknown lm-eval task 'sp_mcc' (did you mean 'sp_mc'?)"),
    ("lm-eval:arc_easy", True, "reads its data from the Hugging Face hub"),
    ("lm-eval:sp_mc", "missing", "not a folder of task YAML files"),
    ("lm-evil:sp_mc", True, "unknown task 'lm-evil:sp_mc'"),
])
def test_lm_eval_bad_input_is_one_line_before_the_model_loads(tasks, include, message, model_dirs, use_data,
                                                             tasks_dir, tmp_path, capsys, monkeypatch):
    import smartprune.hf
    import smartprune.runs.evaluate as runs_evaluate

    monkeypatch.setattr(smartprune.hf, "hub_reachable", lambda timeout=3.0: False)  # as on this offline machine
    monkeypatch.setattr(lm_eval_tasks, "_verified", set())  # no earlier test's check stands in for this one
    monkeypatch.setattr(runs_evaluate, "load_model", lambda *a, **k: pytest.fail("a model loaded first"))
    folder = tmp_path / "nothing" if include == "missing" else tasks_dir
    argv = ["eval", model_dirs["llama"], "--tasks", tasks] + (["--lm-eval-include", folder] if include else [])
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in _one_clean_line(err)


def test_lm_eval_tasks_are_checked_once_not_per_model(tasks_dir, monkeypatch):
    import smartprune.hf

    probes = []
    monkeypatch.setattr(smartprune.hf, "hub_reachable", lambda timeout=3.0: probes.append(1) or False)
    monkeypatch.setattr(lm_eval_tasks, "_verified", set())
    for _ in range(3):  # `eval A B C` checks before loading, then once per model
        lm_eval_tasks.check(["lm-eval:sp_mc", "wikitext2"], str(tasks_dir))
    assert len(probes) == 1
    lm_eval_tasks.check(["lm-eval:sp_rolling"], str(tasks_dir))  # a new task is checked
    assert len(probes) == 2


def test_lm_eval_runs_on_a_structured_model(model_dirs, use_data, tasks_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("export: standard\nff_neurons: {rate: 0.5}\nattn_heads: {rate: 0.5}\n")
    code, _, err = run(capsys, "compress", model_dirs["llama"], "--recipe", recipe, "--out", tmp_path / "s",
                       "--calib-samples", "4", "--calib-seqlen", "16")
    assert code == 0, err
    code, _, err = run(capsys, "eval", tmp_path / "s", "--tasks", "lm-eval:sp_rolling", "--lm-eval-include",
                       tasks_dir, "--json", tmp_path / "s.json")
    assert code == 0, err
    result = json.loads((tmp_path / "s.json").read_text())["results"]["lm-eval:sp_rolling"]
    assert result["bits_per_byte"] > 0 and result["lm_eval"]["n_samples"]["effective"] == len(TEXTS)


def _evil_folder(root, where: str):
    """A task folder whose YAML makes lm-eval import `evil.py` (which would leave a marker file): in the
    folder's own YAML, or in a YAML outside it that the folder's `include:` names."""
    folder, outside = root / "tasks", root / "elsewhere"
    folder.mkdir()
    outside.mkdir()
    for d in (folder, outside):
        (d / "evil.py").write_text(f"open({str(root / 'ran')!r}, 'w').write('x')\n"
                                   "def process_docs(ds):\n    return ds\n")
    hook = "process_docs: !function evil.process_docs\n"
    base = "task: sp_evil\ndataset_path: json\ntest_split: test\noutput_type: loglikelihood_rolling\n"
    if where == "folder":
        (folder / "sub").mkdir()
        (folder / "sub" / "evil.yaml").write_text(base + hook)
    else:
        (outside / "base.yaml").write_text(hook)
        (folder / "evil.yaml").write_text(f"include: ../elsewhere/base.yaml\n{base}")
    return folder


@pytest.mark.parametrize("where", ["folder", "included"])
def test_a_task_folder_runs_no_code_unless_allowed(where, model_dirs, use_data, tmp_path, capsys, monkeypatch):
    import smartprune.runs.evaluate as runs_evaluate

    folder = _evil_folder(tmp_path, where)
    monkeypatch.setattr(runs_evaluate, "load_model", lambda *a, **k: pytest.fail("a model loaded first"))
    code, _, err = run(capsys, "eval", model_dirs["llama"], "--tasks", "lm-eval:sp_evil", "--lm-eval-include", folder)
    line = _one_clean_line(err)
    assert code == 2 and "!function evil.process_docs" in line and "--lm-eval-allow-code" in line
    assert ("sub/evil.yaml" if where == "folder" else "elsewhere/base.yaml") in line
    assert not (tmp_path / "ran").exists()
    lm_eval_tasks.check_no_code(str(folder), allow_code=True)  # allowed: the scan stands aside


# Held-out spellings of the same tag (each resolves to `!function` in lm-eval's loader, checked below): a `%TAG`
# handle, a %-escape, a UTF-16 file, an include list, an include through an alias, the verbatim form.
SPELLINGS = {"tag handle": ("%TAG !f! !func\n---\ntask: x\nprocess_docs: !f!tion evil.p\n", "t.yaml"),
             "escape": ("task: x\nprocess_docs: !%66unction evil.p\n", "t.yaml"),
             "utf-16": ("task: x\nprocess_docs: !function evil.p\n", "t.yaml"),
             "include list": ("include:\n  - ../out/base.yaml\ntask: x\n", "base.yaml"),
             "include alias": ("task: x\nmeta: &a ../out/base.yaml\ninclude: *a\n", "base.yaml"),
             "verbatim": ("task: x\nprocess_docs: !<!function> evil.p\n", "t.yaml")}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_every_spelling_of_the_code_tag_is_refused(spelling, tmp_path):
    from lm_eval.tasks._yaml_loader import load_yaml

    text, named = SPELLINGS[spelling]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "base.yaml").write_text("process_docs: !function evil.p\n")
    task = tmp_path / "tasks" / "t.yaml"
    task.write_bytes(text.encode("utf-16" if spelling == "utf-16" else "utf-8"))
    # lm-eval's own loader reads it as the code tag (resolve_func=False: the function's path, nothing imported)
    assert load_yaml(task, resolve_func=False)["process_docs"].endswith("evil.p")
    with pytest.raises(lm_eval_tasks.DataError, match=f"{named} runs Python code \\(!function evil.p\\)"):
        lm_eval_tasks.check_no_code(str(tmp_path / "tasks"))


def test_the_code_tag_in_a_comment_or_a_string_is_data(tmp_path):
    (tmp_path / "t.yaml").write_text("task: x\n# !function in a comment\ndoc_to_text: '!function is text'\n")
    lm_eval_tasks.check_no_code(str(tmp_path))  # no code: nothing refused
