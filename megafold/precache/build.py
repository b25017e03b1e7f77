"""Build a precache store from structure files: ``build(sources, out)`` and its CLI.

Two passes over the sources, both in worker processes:
  1. scan: parse every source once for the search databases (input chain sequences
     join the MSA database; protein chains form the template database);
  2. build: per entry, tokenize, read or search MSAs, search templates, assemble every
     feature, and write the entry atomically.
An entry is skipped on rerun when its inputs (source file, MSA files, sequence database,
pipeline version) are unchanged and it still verifies; everything else is (re)built.
One bad input never stops a build: its reason lands in ``BuildReport.skipped``. A worker
process that dies (killed, out of memory) is replaced; the entries it held are retried
alone, and one that kills its worker again is skipped.
"""

from __future__ import annotations

import fcntl
import hashlib
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from megafold.arguments import OneLineParser, one_line, positive_int
from megafold.errors import CacheError, ConfigError, MegafoldError, StructureError
from megafold.precache.store import PIPELINE_VERSION, SCHEMA_VERSION, Store, create_store, verify_entry, write_entry

STRUCTURE_SUFFIXES = (".cif", ".mmcif", ".pdb", ".ent")


@dataclass
class BuildReport:
    """What a build did: entries built now, kept from before, and skipped with the reason."""

    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [
            f"precache: {len(self.built)} built, {len(self.reused)} unchanged, "
            f"{len(self.skipped)} skipped in {self.seconds:.1f} s"
        ]
        lines += [f"  skipped {key}: {reason}" for key, reason in sorted(self.skipped.items())]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Task:
    key: str
    path: str
    inputs: dict


def entry_key(path: str | Path) -> str:
    """Store key of a structure file: its name without structure/compression suffixes."""
    name = _uncompressed_name(Path(path))
    for suffix in STRUCTURE_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def _uncompressed_name(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".bz2")


def _is_structure_file(path: Path) -> bool:
    return path.is_file() and _uncompressed_name(path).endswith(STRUCTURE_SUFFIXES)


def find_sources(sources: Iterable[str | Path]) -> list[Path]:
    """Files named directly, plus structure files (also .gz/.bz2) inside named directories.
    A named path that does not exist raises ``CacheError``."""
    found: list[Path] = []
    for source in sources:
        source = Path(source)
        if source.is_dir():
            found += sorted(p for p in source.iterdir() if _is_structure_file(p))
        elif source.exists():
            found.append(source)
        else:
            raise CacheError(f"{source}: no such file or directory")
    return found


def build(
    sources: Iterable[str | Path],
    out: str | Path,
    *,
    seq_db: str | Path | None = None,
    workers: int = 1,
    msa_dir: str | Path | None = None,
    search: bool = True,
    templates: bool = True,
    force: bool = False,
    progress: bool = True,
) -> BuildReport:
    """Precache the structures in ``sources`` (files or directories) into the store ``out``.

    seq_db: FASTA (optionally gzipped) to search MSAs in; default the shipped UniProt
        subset. The protein chains of all sources are added to it.
    msa_dir: precomputed MSAs, ``{msa_dir}/{key}/{auth_chain}.a3m`` (or .sto, or a folder
        of files per chain); MSAs searched during the build are written there too.
    search: False builds chains without an MSA file with the query sequence alone.
    templates: False leaves every template slot empty (template_mask False).
    force: rebuild every entry even if its inputs are unchanged.
    """
    from megafold.data.msa import default_sequence_db

    started = time.perf_counter()
    if workers < 1:
        raise ConfigError(f"workers must be a positive integer, got {workers}")
    seq_db = Path(seq_db) if seq_db is not None else default_sequence_db()
    if search and not seq_db.is_file():
        raise CacheError(f"{seq_db}: sequence database not found")
    paths = find_sources(sources)  # before the store exists: a typo leaves nothing behind
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CacheError(f"{out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"{out}: cannot create the store directory ({exc.strerror or exc})") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise CacheError(f"{out}: not writable")
    report = BuildReport()
    settings = {
        "out": str(out),
        "seq_db": str(seq_db) if search else None,
        "msa_dir": str(msa_dir) if msa_dir is not None else None,
        "search": search,
        "templates": templates,
    }
    with _build_lock(out):
        create_store(out)
        _remove_stale_temporaries(out)
        tasks = _plan(paths, out, settings, report, force=force)
        todo = [t for t in tasks if t.key not in report.reused]
        if todo:
            _preload_ccd()
            # Every source feeds the search databases, the unchanged ones included.
            scans = _run_pool(_scan_entry, tasks, settings, workers, report, progress, "scan", context=None)
            context = _search_context(list(scans.values()))
            todo = [t for t in todo if t.key in scans]
            built = _run_pool(_build_entry, todo, settings, workers, report, progress, "precache", context=context)
            report.built = sorted(built)
    report.seconds = time.perf_counter() - started
    return report


def _plan(paths: Sequence[Path], out: Path, settings: dict, report: BuildReport, *, force: bool) -> list[_Task]:
    """Every source as a task; entries whose inputs are unchanged and that verify are reused."""
    seq_db_hash = _file_sha256(Path(settings["seq_db"])) if settings["seq_db"] else None
    tasks, seen = [], set()
    store = Store(out)
    existing = set(store.keys())
    for path in paths:
        key = entry_key(path)
        if key in seen:
            report.skipped[key + f" ({path})"] = f"duplicate key {key!r}: another source has the same name"
            continue
        seen.add(key)
        if not path.is_file():
            report.skipped[key] = f"{path}: no such file"
            continue
        inputs = {
            "source": str(path),
            "source_sha256": _file_sha256(path),
            "msa_files_sha256": _msa_files_digest(settings["msa_dir"], key),
            "seq_db_sha256": seq_db_hash,
            "search": settings["search"],
            "templates": settings["templates"],
        }
        task = _Task(key, str(path), inputs)
        tasks.append(task)
        if force or key not in existing:
            continue
        previous = store.attrs(key) if key in store else {}
        unchanged = (
            previous.get("pipeline_version") == PIPELINE_VERSION
            and previous.get("schema_version") == SCHEMA_VERSION
            and _same_inputs(previous.get("inputs", {}), inputs)
        )
        if unchanged and verify_entry(out / key) is None:
            report.reused.append(key)
    return tasks


def _same_inputs(previous: dict, current: dict) -> bool:
    # The source path may move (a copied tree); its content hash is what counts.
    ignore = {"source"}
    return {k: v for k, v in previous.items() if k not in ignore} == {k: v for k, v in current.items() if k not in ignore}


# ---------------------------------------------------------------- workers

_WORKER: dict = {}


def _init_worker(settings: dict, context: dict | None) -> None:
    _WORKER.clear()
    _WORKER.update(settings=settings, context=context)


def _scan_entry(task: _Task):
    """Pass 1: the search-database contributions of one source (or the reason it fails)."""
    from megafold.data.pipeline import input_sequences
    from megafold.data.structures import load_structure
    from megafold.data.templates import template_chains

    structure = load_structure(task.path)
    return {"sequences": input_sequences([structure]), "template_chains": template_chains(structure)}


def _search_context(scans: list[dict]) -> dict:
    return {
        "sequences": {name: seq for scan in scans for name, seq in scan["sequences"].items()},
        "template_chains": [chain for scan in scans for chain in scan["template_chains"]],
    }


def _build_entry(task: _Task):
    """Pass 2: featurize one source and write its entry."""
    from megafold.data.features import validate_example
    from megafold.data.msa import SequenceDatabase, write_a3m
    from megafold.data.pipeline import chain_msas, chain_templates, describe, make_example
    from megafold.data.structures import load_structure
    from megafold.data.templates import TemplateDatabase
    from megafold.data.tokenize import tokenize

    settings, context = _WORKER["settings"], _WORKER["context"]
    if "sequence_db" not in _WORKER:
        _WORKER["sequence_db"] = (
            SequenceDatabase(settings["seq_db"], extra=context["sequences"]) if settings["search"] else None
        )
        _WORKER["template_db"] = TemplateDatabase(context["template_chains"]) if settings["templates"] else None
    structure = load_structure(task.path)
    tokens = tokenize(structure)
    msas, origin = chain_msas(
        structure, key=task.key, msa_dir=settings["msa_dir"], sequence_db=_WORKER["sequence_db"]
    )
    if settings["msa_dir"] is not None:
        for c, how in origin.items():
            if how == "search":
                write_a3m(msas[c], Path(settings["msa_dir"]) / task.key / f"{structure.chains[c].auth_chain_id}.a3m")
    hits = chain_templates(structure, msas, _WORKER["template_db"])
    example = make_example(structure, tokens=tokens, msas=msas, templates=hits)
    validate_example(example, f"{task.path}")  # schema, shapes, no NaN/inf: before it is stored
    inputs = dict(task.inputs, msa_files_sha256=_msa_files_digest(settings["msa_dir"], task.key))
    metadata = describe(structure, tokens, msas, origin, hits)
    write_entry(settings["out"], task.key, example, {"inputs": inputs, "metadata": metadata})
    return task.key


def _run_pool(function, tasks, settings, workers, report, progress, label, *, context) -> dict:
    """Run ``function`` over ``tasks`` in worker processes; returns key -> result.

    Failures land in ``report.skipped`` (StructureError / CacheError messages as they
    are). A dead worker breaks the pool: the tasks it may have held are retried one at a
    time in a fresh pool, and a task that kills its worker alone is skipped.
    """
    from tqdm.auto import tqdm

    results: dict = {}
    if not tasks:
        return results
    bar = tqdm(total=len(tasks), desc=label, unit="entry", disable=not progress, file=sys.stderr)
    pending = deque(tasks)
    suspects: deque = deque()
    while pending or suspects:
        isolated = not pending
        queue = pending if pending else deque([suspects.popleft()])
        limit = 1 if isolated else max(1, workers)
        with ProcessPoolExecutor(
            max_workers=limit,
            mp_context=_mp_context(),
            initializer=_init_worker,
            initargs=(settings, context),
        ) as pool:
            running: dict = {}
            broken = False
            while (queue or running) and not broken:
                while queue and len(running) < limit:
                    task = queue.popleft()
                    running[pool.submit(function, task)] = task
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    task = running.pop(future)
                    try:
                        results[task.key] = future.result()
                    except BrokenProcessPool:
                        broken = True
                        _worker_died(task, isolated, suspects, report, bar)
                        continue
                    except (StructureError, CacheError) as exc:
                        report.skipped[task.key] = str(exc)
                    except Exception as exc:  # one bad input never stops the build
                        report.skipped[task.key] = f"{task.path}: {type(exc).__name__}: {exc}"
                    bar.update(1)
            for task in running.values():  # in flight when the pool broke
                _worker_died(task, isolated, suspects, report, bar)
    bar.close()
    return results


def _worker_died(task, isolated: bool, suspects: deque, report: BuildReport, bar) -> None:
    if isolated:
        report.skipped[task.key] = f"{task.path}: the worker process died while building it (killed or out of memory)"
        bar.update(1)
    else:
        suspects.append(task)


def _preload_ccd() -> None:
    """Read biotite's CCD once in the parent (its categories deserialize lazily, ~2 s):
    forked workers share it instead of each paying for it."""
    if _mp_context().get_start_method() == "fork":
        import biotite.structure.info as info

        from megafold.data import ccd

        ccd.component("ALA")
        info.bonds_in_residue("ALA")


def _mp_context():
    # fork starts workers in milliseconds; elsewhere (macOS, Windows) spawn is the safe default.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() and sys.platform == "linux" else "spawn"
    return multiprocessing.get_context(method)


# ---------------------------------------------------------------- helpers


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _msa_files_digest(msa_dir: str | None, key: str) -> str | None:
    """sha256 over the names and contents of every file under ``{msa_dir}/{key}``."""
    if msa_dir is None:
        return None
    folder = Path(msa_dir) / key
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(_file_sha256(path).encode())
    return digest.hexdigest()


class _build_lock:
    """An exclusive lock on the store directory itself for the length of a build (one
    builder per store; no lock file is left behind)."""

    def __init__(self, out: Path):
        self.out = out

    def __enter__(self):
        self.fd = os.open(self.out, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise CacheError(f"{self.out}: another build is running on this store") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _remove_stale_temporaries(out: Path) -> None:
    """Hidden groups left by an interrupted build (never visible as entries) are removed."""
    for path in out.iterdir():
        if path.is_dir() and path.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- CLI


def build_main(argv: Sequence[str] | None = None) -> int:
    """``megafold precache SRC... --out STORE [--seq-db FASTA] [--workers K] ...``.

    Returns the process exit code: 0 when every source was built or unchanged, 1 when
    some were skipped (listed with the reason), 2 on a usage or store error (one line on
    stderr, as every ``megafold`` command reports them).
    """
    parser = OneLineParser(
        prog="megafold precache", description="Precompute AF3 features of structure files into a zarr store."
    )
    parser.add_argument("sources", nargs="+", help="mmCIF/PDB files (optionally gzipped) or directories of them")
    parser.add_argument("--out", required=True, help="the store directory (created if missing)")
    parser.add_argument("--seq-db", default=None, help="FASTA to search MSAs in (default: shipped UniProt subset)")
    parser.add_argument("--workers", type=positive_int, default=1, help="worker processes (default 1)")
    parser.add_argument("--msa-dir", default=None, help="precomputed MSAs: MSA_DIR/KEY/CHAIN.a3m; searches land here")
    parser.add_argument("--no-search", action="store_true", help="no MSA search: chains without files get the query only")
    parser.add_argument("--no-templates", action="store_true", help="leave every template slot empty")
    parser.add_argument("--force", action="store_true", help="rebuild entries even if their inputs are unchanged")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        report = build(
            args.sources,
            args.out,
            seq_db=args.seq_db,
            workers=args.workers,
            msa_dir=args.msa_dir,
            search=not args.no_search,
            templates=not args.no_templates,
            force=args.force,
            progress=not args.quiet,
        )
    except MegafoldError as exc:
        print(f"megafold: error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(report)
    return 1 if report.skipped else 0
