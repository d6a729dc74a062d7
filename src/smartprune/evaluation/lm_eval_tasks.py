"""lm-evaluation-harness tasks on smartprune-loaded models (the optional `lm-eval` extra).

The field judges a compressed model by lm-eval's own task definitions, so we run those, not copies:
lm-eval's `HFLM` wraps the model object we loaded (compact or dense residency, structured or not, on
the device the CLI resolved) with its tokenizer, and `simple_evaluate` runs the task as lm-eval's CLI
would on a folder. Task names are `lm-eval:NAME`; `include` adds a folder of local task YAMLs (lm-eval's
`--include_path`). Results come back as ``{metric: value}`` with lm-eval's filter suffix (",none")
removed, so they sit in the same JSON and tables as our own tasks.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

from smartprune.errors import DataError, did_you_mean

log = logging.getLogger(__name__)

PREFIX = "lm-eval:"
INSTALL = "lm-evaluation-harness is not installed: `pip install 'smartprune[lm-eval]'` (./run installs it)"


def is_lm_eval(task: str) -> bool:
    return task.startswith(PREFIX)


def expand(names: list[str], own: set[str]) -> list[str]:
    """`--tasks lm-eval:a,b,wikitext2` -> lm-eval:a, lm-eval:b, wikitext2: after an lm-eval name, a bare
    name that is not one of ours belongs to lm-eval too."""
    out, inside = [], False
    for n in names:
        if is_lm_eval(n):
            inside = True
            out.append(n)
        elif inside and n not in own:
            out.append(PREFIX + n)
        else:
            inside = False
            out.append(n)
    return out


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise DataError(INSTALL) from None
    return lm_eval


# lm-eval makes a task YAML import and run Python through one tag, `!function module.name` (its loader is
# otherwise YAML's safe one, which refuses `!!python/...`). A task folder is data, so that tag is refused unless
# the user allows code (--lm-eval-allow-code). The files are parsed as lm-eval parses them, not searched as text:
# a tag can be spelled many ways in YAML (`%TAG` handles, `%66`-escapes, a UTF-16 file) and resolves to the same
# `!function`, and `include:` takes a list.
ALLOW_CODE = "--lm-eval-allow-code"
FUNCTION_TAG = "!function"


def _scan_loader():
    """lm-eval's task loader (`lm_eval.tasks._yaml_loader`: libyaml's safe loader where present, with
    `!function`), but the tag constructs a harmless marker instead of importing anything."""
    import yaml

    class Scan(yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.FullLoader):
        pass

    Scan.add_constructor(FUNCTION_TAG, lambda loader, node: FUNCTION_TAG)
    return Scan


def _function_node(root):
    """The first node tagged `!function` under `root` (keys and values; aliases visited once), or None;
    walked with a stack, so a deeply nested file is no RecursionError."""
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.tag == FUNCTION_TAG:
            return node
        if isinstance(node.value, list):  # a sequence's items, or a mapping's (key, value) pairs
            stack.extend(sub for child in node.value for sub in (child if isinstance(child, tuple) else (child,)))
    return None


def _includes(path: Path, data: bytes, loader) -> list[Path]:
    """The files `path`'s `include:` names (a name or a list, relative to the file, as lm-eval resolves them);
    none where the file does not load (lm-eval cannot load it either, so it runs nothing from it)."""
    import yaml

    try:
        cfg = yaml.load(data, Loader=loader)  # loaded, not read off the nodes: a `<<:` merge may bring `include:`
    except (yaml.YAMLError, ValueError, RecursionError):
        return []
    names = cfg.get("include", []) if isinstance(cfg, dict) else []
    return [path.parent / n if not Path(n).is_absolute() else Path(n)
            for n in (names if isinstance(names, list) else [names]) if isinstance(n, str)]


def check_no_code(include: str, allow_code: bool = False) -> None:
    """A task folder runs no code unless allowed: every YAML in it (and every file their ``include:`` keys
    name, transitively) is parsed as lm-eval parses it and refused, in one line naming the file, where a value
    is tagged `!function`."""
    if allow_code:
        return
    import yaml

    loader = _scan_loader()
    folder = Path(include)
    todo = sorted(p for suffix in ("yaml", "yml") for p in folder.glob(f"**/*.{suffix}") if p.is_file())
    seen: set[Path] = set()
    while todo:
        path = todo.pop().resolve()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        try:
            data = path.read_bytes()
            root = yaml.compose(data, Loader=loader)
        except yaml.YAMLError:
            continue  # lm-eval's loader fails on it as well: nothing of it runs
        hit = None if root is None else _function_node(root)
        if hit is not None:
            raise DataError(f"--lm-eval-include {include}: {path} runs Python code ({FUNCTION_TAG} {hit.value}); "
                            f"task folders run no code unless you pass {ALLOW_CODE}")
        todo.extend(_includes(path, data, loader))


@lru_cache(maxsize=4)
def _task_manager(include: str | None):
    _lm_eval()
    from lm_eval.tasks import TaskManager

    if include is not None and not Path(include).is_dir():
        raise DataError(f"--lm-eval-include {include}: not a folder of task YAML files")
    return TaskManager(include_path=include)


LOCAL_BUILDERS = {"json", "csv", "text", "parquet", "arrow"}  # datasets' builders that read local data_files
_verified: set[tuple[str, str | None]] = set()  # (task, include) already checked: `eval` checks once, then per model


def check(tasks: list[str], include: str | None, allow_code: bool = False) -> None:
    """Every `lm-eval:` task known to lm-eval (with `include`'s YAMLs, which run no code unless
    `allow_code`) and, when the hub cannot be reached, its data local: all before any model loads."""
    from smartprune.hf import hub_reachable

    if include is not None and Path(include).is_dir():
        check_no_code(include, allow_code)
    names = [t.removeprefix(PREFIX) for t in tasks if is_lm_eval(t)]
    if all((n, include) in _verified for n in names):  # nothing new: no second hub probe per model
        return
    manager = _task_manager(include)
    known = manager.all_tasks
    for n in names:
        if not n or n not in known:
            raise DataError(f"unknown lm-eval task '{n}'{did_you_mean(n, known)}; `python -m lm_eval ls tasks` "
                            "lists lm-eval's, --lm-eval-include DIR adds local task YAMLs")
    if hub_reachable():
        _verified.update((n, include) for n in names)
        return
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a group's tasks (seen at run time) fail at once, not retry
    remote = [n for n in names if _remote_data(manager.task_index.get(n))]
    if remote:
        raise DataError(f"lm-eval task '{remote[0]}' reads its data from the Hugging Face hub "
                        f"({manager.task_index[remote[0]].cfg['dataset_path']}), which this machine cannot reach; "
                        "offline, only tasks whose data are local files run (--lm-eval-include)")
    _verified.update((n, include) for n in names)


def _remote_data(entry) -> bool:
    cfg = getattr(entry, "cfg", None) or {}
    path = cfg.get("dataset_path")
    return isinstance(path, str) and path not in LOCAL_BUILDERS and not Path(path).expanduser().exists()


def run(model, tokenizer, task: str, *, include: str | None, limit: int | None, batch_size: int,
        seed: int) -> dict:
    """One lm-eval task on a loaded model: ``{metric: value, ..., "lm_eval": {...}}``."""
    import torch

    _lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    name = task.removeprefix(PREFIX)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device),
              max_length=getattr(model.config, "max_position_embeddings", None))
    try:
        out = simple_evaluate(model=lm, tasks=[name], task_manager=_task_manager(include), limit=limit,
                              log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed, verbosity="ERROR")
    except (ConnectionError, OSError) as exc:  # the hub's datasets, with no network
        raise DataError(f"lm-eval task '{name}' could not load its data ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); offline, only tasks whose data are "
                        "local files run (--lm-eval-include)") from None
    except Exception as exc:
        if type(exc).__name__ in ("DatasetNotFoundError", "HfHubHTTPError", "LocalEntryNotFoundError"):
            raise DataError(f"lm-eval task '{name}' needs its dataset from the Hugging Face hub, which this "
                            "machine cannot reach; offline, only tasks whose data are local files run") from None
        raise
    results = out["results"][name]
    metrics = {k.split(",")[0]: float(v) for k, v in results.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {**metrics, "lm_eval": {"version": _lm_eval().__version__, "n_samples": out.get("n-samples", {}).get(name),
                                   "config": out.get("configs", {}).get(name, {}).get("output_type")}}


def shown(result: dict) -> list[str]:
    """The metrics a table shows: lm-eval's values, not their standard errors or bookkeeping."""
    return [k for k, v in result.items()
            if isinstance(v, float) and not k.endswith("_stderr") and k not in ("sample_len", "seconds")]
