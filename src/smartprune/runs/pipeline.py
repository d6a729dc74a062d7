"""The one executor of a run: pre-flight, then load -> (evaluate dense) -> compress -> (evaluate) ->
recover -> (evaluate) -> (measure) -> save. `compress` and `demo` are specifications of it
(runs/spec.py); what each phase does is the library's (compression/, training/, evaluation/, storage/)."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from smartprune.compression.engine import compress
from smartprune.errors import ArtifactError
from smartprune.evaluation.perplexity import perplexity
from smartprune.files import read_json, write_json
from smartprune.runs.environment import environment
from smartprune.runs.preflight import IDENTITY, RESUME_POINT, Prepared, check_windows, preflight
from smartprune.runs.spec import RunSpec
from smartprune.storage.gguf_writer import check_tokenizer, export_name, write_gguf
from smartprune.storage.save import plain_model, save, write_dense
from smartprune.storage.sources import load_model, model_reference


@dataclass
class RunResult:
    spec: RunSpec
    prepared: Prepared
    report: dict
    evaluations: dict[str, dict] = field(default_factory=dict)  # dense / compressed / recovered perplexity
    seconds: dict[str, float] = field(default_factory=dict)  # per phase, in the order they ran
    cost: dict | None = None  # running cost of the final model against dense (`measure_cost`)
    model: object = None  # the final model (compressed, recovered where asked), on the CPU
    tokenizer: object = None


class _Run:
    """One execution's state: the loaded model, the clock, and the phases that share them."""

    def __init__(self, spec: RunSpec, prepared: Prepared, started: float) -> None:
        self.spec, self.p = spec, prepared
        self.result = RunResult(spec, prepared, {})
        self.started = started
        self.loaded = load_model(spec.model)
        if spec.outputs.gguf_out is not None:  # the tokenizer is known once loaded: refused before the work
            check_tokenizer(self.loaded.tokenizer)
        if not spec.resume:
            ev = spec.evaluation
            check_windows(self.loaded.model, prepared.recipe.calibration.seqlen, prepared.recovery,
                          None if ev is None else ev.seqlen)
        self.result.seconds["load"] = time.perf_counter() - started

    def evaluate(self, name: str) -> None:
        if self.spec.evaluation is None:
            return
        if name == "dense" and self.spec.evaluation.dense is not None:  # scored by an earlier run
            self.result.evaluations[name] = self.spec.evaluation.dense
            return
        t = time.perf_counter()
        self.loaded.model.to(self.p.device)
        self.result.evaluations[name] = perplexity(self.loaded.model, self.loaded.tokenizer, "wikitext2",
                                                   seqlen=self.spec.evaluation.seqlen, limit=self.p.limit,
                                                   progress=self.spec.progress).to_dict()
        self.result.seconds[f"{name} eval"] = time.perf_counter() - t

    def compress(self):
        """Compress the loaded model (or take the kept one of an interrupted recovery); returns the teacher."""
        from smartprune.runs.recover import snapshot_teacher
        from smartprune.storage.load import load

        spec, p, checkpoints = self.spec, self.p, self.p.checkpoints(self.spec.outputs.out)
        if spec.resume:  # the compressed model kept before its recovery, retrained from the checkpoint on
            self.result.report = read_json(checkpoints / RESUME_POINT / "report.json", "report", ArtifactError)
            self.student = load(checkpoints / RESUME_POINT, structured=False)
            return None if p.recovery.teacher == "none" else self.loaded.model
        self.loaded.model.to("cpu")
        teacher = snapshot_teacher(self.loaded.model, p.recovery)
        t = time.perf_counter()
        c = spec.compute
        result = compress(self.loaded.model, self.loaded.tokenizer, p.recipe, seed=spec.seed, progress=spec.progress,
                          device=p.device, offload=c.offload, compute_dtype=c.compute_dtype)
        self.result.seconds["compress"] = time.perf_counter() - t
        self.result.report = {"model": model_reference(spec.model), "source": self.loaded.source, **result.report,
                              "environment": environment()}
        self.student = self.loaded.model
        if checkpoints is not None:
            keep_resume_point(self.student, self.loaded.tokenizer, self.result.report, checkpoints, p.identity)
        return teacher

    def recover(self, teacher) -> None:
        from smartprune.training.blockwise import removed_in
        from smartprune.training.recover import recover

        if self.p.recovery is None:
            return
        t = time.perf_counter()
        self.result.report["recovery"] = recover(
            self.student, self.loaded.tokenizer, self.p.recovery, teacher=teacher, device=self.p.device,
            seed=self.spec.seed, checkpoint_dir=self.p.checkpoints(self.spec.outputs.out), resume=self.spec.resume,
            progress=self.spec.progress, removed_blocks=removed_in(self.result.report))
        self.result.seconds["recover"] = time.perf_counter() - t
        self.student.to("cpu")
        self.evaluate("recovered")

    def measure(self) -> None:
        if not self.spec.measure:
            return
        t = time.perf_counter()
        self.result.cost = measure_cost(self.spec.model, [self.student], self.loaded.tokenizer,
                                        self.spec.overrides.quick, self.spec.progress)[0]
        self.result.seconds["measure"] = time.perf_counter() - t

    def save(self) -> None:
        o, tokenizer = self.spec.outputs, self.loaded.tokenizer
        if o.out is not None:
            save(self.student, o.out, tokenizer=tokenizer, report=self.result.report, overwrite=o.overwrite,
                 dtype=o.dtype)
        if o.dense_out is not None:
            write_dense(self.student, o.dense_out, tokenizer=tokenizer, overwrite=o.overwrite)
        if o.gguf_out is not None:
            write_gguf(plain_model(self.student), o.gguf_out, tokenizer=tokenizer, gguf_type=o.gguf_type,
                       name=export_name(self.spec.model, self.p.recipe.name))
        checkpoints = self.p.checkpoints(o.out)
        if checkpoints is not None:  # the model is written: its recovery checkpoint is no longer needed
            shutil.rmtree(checkpoints, ignore_errors=True)


def execute(spec: RunSpec) -> RunResult:
    """Run `spec`: every check first (`preflight`), then each phase it asks for; the caller words the
    result (and writes its JSON record, which differs per job)."""
    started = time.perf_counter()
    run = _Run(spec, preflight(spec), started)
    run.evaluate("dense")
    teacher = run.compress()
    run.evaluate("compressed")
    run.recover(teacher)
    run.measure()
    run.save()
    run.result.model, run.result.tokenizer = run.student.to("cpu"), run.loaded.tokenizer
    run.result.seconds["total"] = time.perf_counter() - started
    return run.result


def keep_resume_point(model, tokenizer, report: dict, folder: Path, identity: dict) -> None:
    """Keep the just-compressed model beside the recovery checkpoint: `--resume` retrains it from the
    checkpoint instead of compressing again (the structure must exist before the weights load)."""
    shutil.rmtree(folder, ignore_errors=True)  # ours (a hidden sibling of --out): an older run's leftovers
    save(model, folder / RESUME_POINT, tokenizer=tokenizer, report=report)
    write_json(folder / IDENTITY, identity)


def measure_cost(model: str, finals: list, tokenizer, quick: bool, progress: bool) -> list[dict]:
    """Each final model written to a temporary compressed folder and all measured against MODEL in one
    bench run (`smartprune.runs.cost`): a short one, sized for the demo's time, of each model held the way
    it would be deployed (packed when it has pruned entries); `compare --measure` and `bench` give the
    rest. One cost record per final model, each with the dense model's entry and the machine."""
    import tempfile

    from smartprune.runs.cost import keep, measure

    length, new_tokens = 128, (16 if quick else 64)
    masked = {any(getattr(m, "mask", None) is not None for m in f.modules()) for f in finals}
    # packed where there are pruned entries; both where the models differ (each row labelled)
    held = ("dense", "compact") if len(masked) > 1 else ("compact",) if masked == {True} else ("dense",)
    with tempfile.TemporaryDirectory(prefix="smartprune-demo-") as tmp:
        specs = [keep(f.to("cpu"), tokenizer, Path(tmp) / f"model-{i}") for i, f in enumerate(finals)]
        entries, machine = measure([model, *specs], ("speed", "memory"), repeats=1, length=length,
                                   new_tokens=new_tokens, device="cpu", residencies=held,
                                   progress=progress)
    return [{"dense": entries[0][0], "compressed": e, "machine": machine, "length": length, "new_tokens": new_tokens}
            for e in entries[1:]]
