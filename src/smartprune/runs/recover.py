"""`smartprune recover`: load a compressed model and its teacher, retrain, write the result; on one
process, on ``nproc`` local processes, or under ``torchrun`` (one process per GPU or CPU slot)."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from smartprune.device import resolve_device
from smartprune.errors import ArtifactError, DataError, OutputError, Terminated
from smartprune.files import (
    atomic_dir,
    check_free_space,
    check_output,
    check_output_file,
    check_outputs_apart,
    read_json,
    write_json,
)
from smartprune.recipes.schema import RecoverConfig
from smartprune.runs.bench import what_you_got
from smartprune.storage.format import MANIFEST, TENSORS
from smartprune.storage.gguf_writer import check_tokenizer, export_name, write_gguf
from smartprune.storage.save import plain_model, save, write_dense
from smartprune.storage.sources import check_model, model_reference
from smartprune.training.blockwise import removed_in
from smartprune.training.checkpoint import CHECKPOINT
from smartprune.training.distributed import check_batch_split, world
from smartprune.training.recover import recover

log = logging.getLogger(__name__)


@dataclass
class RecoverRun:
    compressed: str
    teacher: str
    out: Path
    recovery: dict
    rank: int = 0  # under torch.distributed only rank 0 prints and writes
    gguf_out: Path | None = None

    def to_dict(self) -> dict:
        return {"compressed": self.compressed, "teacher": self.teacher, "out": str(self.out),
                "recovery": self.recovery}

    def summary(self) -> str:
        r = self.recovery
        s = r["structure"]
        return "\n".join([
            f"recovered {self.compressed} (teacher: {self.teacher}) in {r['seconds']:.0f} s: {r['steps']} steps, "
            f"{r['tokens']:,} tokens, {r['world_size']} process(es) on {r['device']} ({r['compute_dtype']})",
            "",
            f"| held-out perplexity ({r['held_out_text']}) | value |",
            "|---|---:|",
            f"| before | {r['perplexity_before']:,.2f} |",
            f"| after | {r['perplexity_after']:,.2f} |",
            "",
            f"structure kept: {'yes' if s['kept'] else 'NO'} ({s['masked_modules']} masked and "
            f"{s['folded_projections']} folded modules, {s['pruned_entries_nonzero']} pruned entries non-zero)",
            f"recovered model: {self.out}",
            *self._what_you_got(),
        ])

    def _what_you_got(self) -> list[str]:
        """Size against dense and the command that measures speed, from the written folder's report."""
        report = self.out / "report.json"
        if not report.is_file():
            return []
        data = json.loads(report.read_text())
        if "overall" not in data:
            return []
        dense = self.teacher if self.teacher != "none" else data.get("model")
        return what_you_got(data, self.out, dense, self.gguf_out)


def checkpoint_dir(out: Path) -> Path:
    """Checkpoints of a run that writes `out` live beside it (never inside a folder of the user's)."""
    return out.parent / f".{out.name}.recover-checkpoint"


def _load_student(spec: str):
    """The model to retrain, with editable (not structured-inference) modules, and its tokenizer."""
    from transformers import AutoTokenizer

    from smartprune.storage.load import load
    from smartprune.storage.sources import has_tokenizer, load_model

    path = Path(spec).expanduser()
    if path.is_dir() and (path / MANIFEST).is_file():
        tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer(path) else None
        return load(path, structured=False), tokenizer, _report(path), True
    loaded = load_model(spec)  # a dense model: plain fine-tuning or distillation (the "dense fine-tuned" row)
    return loaded.model, loaded.tokenizer, {}, False


@dataclass(frozen=True)
class RecoverJob:
    """One `recover` run: what to retrain, from which teacher, into which folders, where and how."""

    compressed: str
    teacher: str | None  # None: plain fine-tuning
    out: Path
    cfg: RecoverConfig
    dense_out: Path | None = None  # also a plain Hugging Face folder
    gguf_out: Path | None = None  # also a GGUF file (a standard result only)
    gguf_type: str = "f16"
    device: str | torch.device = "auto"
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    nproc: int = 1  # local processes (gloo on CPU, NCCL on GPU)
    progress: bool = True


def recover_model(compressed: str, *, teacher: str | None, out: str | Path, cfg: RecoverConfig,
                  **options) -> RecoverRun:
    """Retrain COMPRESSED (a `compress --out` folder or any model) distilling from TEACHER (a MODEL
    spec, or None/"none" for plain fine-tuning) and write the result to `out`. `options`: the other
    fields of `RecoverJob` (dense_out, gguf_out, gguf_type, device, seed, resume, overwrite, nproc, progress)."""
    teacher = None if teacher in (None, "none") else teacher
    for key in ("dense_out", "gguf_out"):
        if options.get(key) is not None:
            options[key] = Path(options[key])
    job = RecoverJob(compressed, teacher, Path(out), dataclasses.replace(cfg, teacher="dense" if teacher else "none"),
                     **options)
    if not dist.is_initialized():  # every check before any work (in the launching process)
        _preflight(job)
        if job.nproc > 1:
            return _launch(job)
    return _run(job)


def _preflight(job: RecoverJob) -> None:
    check_output(job.out, job.overwrite)
    if job.dense_out is not None:
        check_output(job.dense_out, job.overwrite)
    local = Path(job.compressed).expanduser()
    check_outputs_apart(job.out, job.dense_out, job.gguf_out, local if local.exists() else None)
    resolve_device(job.device)
    check_model(job.compressed)
    if job.gguf_out is not None:
        _check_gguf_out(job, local)
    if job.teacher is not None:
        check_model(job.teacher)
    _check_space(job.compressed, job.out)
    if job.resume and not (checkpoint_dir(job.out) / CHECKPOINT).is_file():
        raise DataError(f"nothing to resume: no checkpoint at {checkpoint_dir(job.out)}")


def _check_gguf_out(job: RecoverJob, local: Path) -> None:
    """--gguf-out, before any work: a model whose compression left a standard architecture (the recipe in
    its report), a family and type the writer knows, a free path. The tokenizer is checked once loaded."""
    from smartprune.recipes.schema import build_recipe, not_standard
    from smartprune.storage.gguf_writer import check_gguf, check_gguf_shape
    from smartprune.storage.sources import model_config

    report = _report(local)
    if "recipe_config" in report:
        why = not_standard(build_recipe(report["recipe_config"], str(report.get("recipe")), str(local)))
        if why:
            raise OutputError(f"--gguf-out: {job.compressed} was compressed with recipe '{report.get('recipe')}', "
                              f"whose {why}")
    config = model_config(job.compressed)
    check_gguf(config.model_type if config is not None else "", job.gguf_type)
    if config is not None:
        check_gguf_shape(config)
    check_output_file(job.gguf_out, job.overwrite)


def _report(local: Path) -> dict:
    """The report.json of a `compress --out` folder ({} for any other model)."""
    path = local / "report.json"
    return read_json(path, "report", ArtifactError) if (local / MANIFEST).is_file() and path.is_file() else {}


def _run(job: RecoverJob) -> RecoverRun:
    """This process's part of the run (all of it on one process); rank 0 writes."""
    joined = _init_from_env(job.device)
    rank, size = world()
    student, tokenizer, report, is_compact = _load_student(job.compressed)
    ref = None
    if job.teacher is not None:
        from smartprune.storage.sources import load_model

        loaded = load_model(job.teacher)
        ref, tokenizer = loaded.model, tokenizer or loaded.tokenizer
    if tokenizer is None:
        raise DataError(f"neither {job.compressed} nor the teacher has tokenizer files; recovery needs one")
    if job.gguf_out is not None:  # before the training, as compress checks it before compressing
        check_tokenizer(tokenizer)
    recovery = recover(student, tokenizer, job.cfg, teacher=ref, device=_rank_device(job.device), seed=job.seed,
                       checkpoint_dir=checkpoint_dir(job.out), resume=job.resume, progress=job.progress,
                       removed_blocks=removed_in(report))
    recovery.update({"teacher": model_reference(job.teacher) if job.teacher else "none",
                     "compressed": model_reference(job.compressed)})
    if rank == 0:
        student.to("cpu")
        _write(student, tokenizer, {**report, "recovery": recovery}, job.out, is_compact, job.overwrite)
        if job.dense_out is not None:
            write_dense(student, job.dense_out, tokenizer=tokenizer, overwrite=job.overwrite)
        if job.gguf_out is not None:
            name = export_name(report.get("model", job.compressed), report.get("recipe", "recovered"))
            write_gguf(plain_model(student), job.gguf_out, tokenizer=tokenizer, gguf_type=job.gguf_type, name=name)
        shutil.rmtree(checkpoint_dir(job.out), ignore_errors=True)
    if size > 1:
        dist.barrier()
    if joined:
        dist.destroy_process_group()
    return RecoverRun(str(job.compressed), job.teacher or "none", job.out, recovery, rank, job.gguf_out)


def _write(model, tokenizer, report: dict, out: Path, is_compact: bool, overwrite: bool) -> None:
    if is_compact:
        save(model, out, tokenizer=tokenizer, report=report, overwrite=overwrite)
        return
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "report.json", report)


def snapshot_teacher(model, cfg: RecoverConfig | None):
    """A frozen copy of the dense model to distil from, taken before compression (None if not needed)."""
    if cfg is None or cfg.teacher == "none":
        return None
    return copy.deepcopy(model).eval().requires_grad_(False)


def _check_space(compressed: str, out: Path) -> None:
    """The retrained model is as large as the compressed one; its checkpoints (weights and two optimizer
    moments) three times that."""
    local = Path(compressed).expanduser()
    weights = local / TENSORS if (local / MANIFEST).is_file() else None
    if weights is not None and weights.is_file():
        size = weights.stat().st_size
        check_free_space(out, size, 4 * size, "the retrained model and its checkpoints")


# ---- processes ---------------------------------------------------------------------------------------
def _rank_device(device: str) -> torch.device:
    """Each process's device: under torch.distributed with GPUs, the GPU of its local rank."""
    dev = resolve_device(device)
    if dev.type == "cuda" and dist.is_initialized():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', dist.get_rank()))}")
    return dev


def _init_from_env(device: str) -> bool:
    """Join the process group `torchrun` (or `_launch`) describes in the environment, once: NCCL when
    the processes run on GPUs, gloo on CPUs. True when this call created it."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init_process_group(backend="nccl" if resolve_device(device).type == "cuda" else "gloo")
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, size: int, port: int, job: RecoverJob) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    try:
        _run(dataclasses.replace(job, nproc=1))
    except KeyboardInterrupt as exc:  # stopped by a signal at a step boundary: say which in the exit status
        # (torch's spawn wrapper would exit 0 on KeyboardInterrupt, as if the run had finished)
        raise SystemExit(143 if isinstance(exc, Terminated) else 130) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


STOP_GRACE_S = 120  # how long stopped workers may take to finish their step and write the checkpoint


def _launch(job: RecoverJob) -> RecoverRun:
    """Run `recover_model` on `nproc` local processes (gloo on CPU, NCCL on GPU); rank 0 writes.

    A signal to this process (a scheduler's SIGTERM, Ctrl-C) is passed on to the workers, which stop
    together at the next step boundary and checkpoint there; then this process exits as they did."""
    import torch.multiprocessing as mp
    from torch.multiprocessing import ProcessExitedException

    check_batch_split(job.cfg.batch_size, job.nproc)  # before spawning, not in every process
    workers = mp.start_processes(_worker, args=(job.nproc, _free_port(), job), nprocs=job.nproc, join=False,
                                 start_method="spawn")
    try:
        while not workers.join(timeout=1.0):
            pass
    except KeyboardInterrupt as exc:  # this process was signalled: the workers stop at a step boundary
        _stop(workers.processes, signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
        raise
    except ProcessExitedException as exc:  # a worker was signalled on its own: the others followed it
        if exc.exit_code in (130, 143):
            raise Terminated() if exc.exit_code == 143 else KeyboardInterrupt() from None
        raise
    report = json.loads((job.out / "report.json").read_text())
    return RecoverRun(str(job.compressed), job.teacher or "none", job.out, report["recovery"], gguf_out=job.gguf_out)


def _stop(processes, signum: int) -> None:
    """Pass `signum` on, give the workers `STOP_GRACE_S` to checkpoint and exit, then kill what is left."""
    import time

    for p in processes:
        if p.is_alive():
            os.kill(p.pid, signum)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in processes:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            log.warning("recovery process %d did not stop within %d s; killed (the last checkpoint stays)", p.pid,
                        STOP_GRACE_S)
            p.kill()
            p.join()
