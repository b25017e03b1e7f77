import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megafold.data.features import FEATURES, validate_example
from megafold.errors import CacheError
from megafold.precache import build, build_main, open_store
from megafold.precache.store import PIPELINE_VERSION, SCHEMA_VERSION

ENTRIES = ["1hvr", "1ubq", "1znf", "2q2k"]


def test_build_writes_every_entry_with_provenance(built_store):
    path, msa_dir, report = built_store
    assert report.built == ENTRIES and not report.skipped and not report.reused
    store = open_store(path)
    assert store.keys() == ENTRIES
    attrs = store.attrs("1ubq")
    assert attrs["schema_version"] == SCHEMA_VERSION and attrs["pipeline_version"] == PIPELINE_VERSION
    assert len(attrs["inputs"]["source_sha256"]) == 64 and set(attrs["checksums"]) >= {"restype", "msa"}
    chain = attrs["metadata"]["chains"][0]
    assert chain["msa_origin"] == "search" and chain["msa_depth"] > 5
    # searched MSAs are kept as a3m next to the store, for the next build
    assert (msa_dir / "1ubq" / "A.a3m").read_text().startswith(">query\nMQIFVKTLTGK")
    for key in ENTRIES:
        example = store.load(key)
        validate_example(example, key)
        for name, spec in FEATURES.items():
            assert example[name].dtype == spec.dtype
    entry = store.load("1ubq")
    assert entry["msa"].shape[0] == chain["msa_depth"]


def test_dataset_has_named_dimensions(built_store):
    store = open_store(built_store[0])
    dataset = store.dataset("2q2k")
    assert dataset["msa"].dims == ("msa_row", "token")
    assert dataset["token_bonds"].dims == ("token", "token2")
    assert dataset["template_backbone"].dims == ("template", "token", "bb", "xyz")
    assert dataset.sizes["token"] == len(store.load("2q2k")["restype"])
    assert json.loads(dataset.attrs["metadata"])["pdb_id"] == "2q2k"
    # plain zarr clients see the same arrays, with dimension names
    import zarr

    group = zarr.open_group(str(built_store[0] / "2q2k"), mode="r")
    assert group["restype"].metadata.dimension_names == ("token",)


def test_malformed_sources_are_skipped_with_the_reason(tmp_path, sources):
    (tmp_path / "broken.cif").write_text("data_x\n_entry.id x\n")
    (tmp_path / "empty.cif").write_bytes(b"")
    report = build(
        [sources / "1znf.cif.gz", tmp_path / "broken.cif", tmp_path / "empty.cif"],
        tmp_path / "store",
        search=False,
        progress=False,
    )
    assert report.built == ["1znf"]
    assert set(report.skipped) == {"broken", "empty"}
    assert "broken.cif" in report.skipped["broken"] and "no atom" in report.skipped["broken"]
    assert "empty.cif" in report.skipped["empty"] and "empty" in report.skipped["empty"]


def test_rerun_reuses_verified_entries_and_rebuilds_changed_ones(store_copy, sources, tmp_path):
    path, msa_dir = store_copy
    source_dir = tmp_path / "src"
    source_dir.mkdir()
    for name in os.listdir(sources):
        (source_dir / name).write_bytes((sources / name).read_bytes())
    report = build([source_dir], path, workers=2, msa_dir=msa_dir, progress=False)
    assert report.reused == ENTRIES and not report.built  # same content, moved files
    # a changed source is rebuilt, the rest reused
    import gzip

    text = gzip.decompress((source_dir / "1znf.cif.gz").read_bytes()) + b"\n# edited\n"
    (source_dir / "1znf.cif.gz").write_bytes(gzip.compress(text))
    report = build([source_dir], path, workers=2, msa_dir=msa_dir, progress=False)
    assert report.built == ["1znf"] and sorted(report.reused) == ["1hvr", "1ubq", "2q2k"]


def test_verify_catches_a_corrupted_chunk_and_build_repairs_it(store_copy, sources):
    path, msa_dir = store_copy
    store = open_store(path)
    assert store.verify() == []
    chunk = path / "1ubq" / "atom_pos" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert store.verify() == ["1ubq"]
    report = build([sources], path, msa_dir=msa_dir, progress=False)
    assert report.built == ["1ubq"] and store.verify() == []


def test_verify_catches_a_missing_chunk(store_copy):
    path, _ = store_copy
    (path / "2q2k" / "msa" / "c" / "0" / "0").unlink()
    assert open_store(path).verify() == ["2q2k"]
    with pytest.raises(CacheError, match="2q2k"):
        open_store(path).load("2q2k")


def test_missing_or_foreign_store_raises_cache_error(tmp_path, store_copy):
    with pytest.raises(CacheError, match="nowhere"):
        open_store(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CacheError, match="plain"):
        open_store(tmp_path / "plain")
    path, _ = store_copy
    with pytest.raises(CacheError, match="no entry 'nope'"):
        open_store(path).load("nope")
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["megafold"]["schema_version"] = 999
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="schema version 999"):
        open_store(path)
    (path / "zarr.json").write_text("{not json")
    with pytest.raises(CacheError, match="corrupt"):
        open_store(path)


def test_killed_worker_leaves_a_store_that_verifies_and_resumes(tmp_path, sources, monkeypatch):
    """A worker dies (SIGKILL) half way through writing 1hvr's arrays."""
    import importlib

    import zarr

    build_module = importlib.import_module("megafold.precache.build")  # the module, not build()
    real_write = build_module.write_entry
    real_create = zarr.Group.create_array

    def dying_write(root, key, example, attrs):
        if key == "1hvr":
            arrays_written = []

            def create_array(group, *args, **kwargs):
                arrays_written.append(1)
                if len(arrays_written) == 12:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_create(group, *args, **kwargs)

            zarr.Group.create_array = create_array  # only in this (forked) worker
        return real_write(root, key, example, attrs)

    monkeypatch.setattr(build_module, "write_entry", dying_write)
    path = tmp_path / "store"
    report = build([sources], path, workers=2, search=False, progress=False)
    assert "1hvr" in report.skipped and "died" in report.skipped["1hvr"]
    assert report.built == ["1ubq", "1znf", "2q2k"]
    store = open_store(path)
    assert store.keys() == ["1ubq", "1znf", "2q2k"] and store.verify() == []
    assert any(p.name.startswith(".tmp-1hvr") for p in path.iterdir())  # the half entry, hidden

    monkeypatch.setattr(build_module, "write_entry", real_write)
    report = build([sources], path, workers=2, search=False, progress=False)
    assert report.built == ["1hvr"] and sorted(report.reused) == ["1ubq", "1znf", "2q2k"]
    assert store.keys() == ENTRIES and store.verify() == []
    assert not any(p.name.startswith(".tmp-") for p in path.iterdir())


def test_cli_exit_codes(tmp_path, sources, capsys):
    (tmp_path / "bad.pdb").write_text("REMARK nothing here\n")
    code = build_main([str(sources / "1znf.cif.gz"), str(tmp_path / "bad.pdb"), "--out", str(tmp_path / "s"), "--no-search", "--quiet"])
    out = capsys.readouterr().out
    assert code == 1 and "1 built" in out and "bad.pdb" in out
    assert build_main([str(sources / "1znf.cif.gz"), "--out", str(tmp_path / "s"), "--no-search", "--quiet"]) == 0
    (tmp_path / "file").write_text("x")
    assert build_main([str(sources / "1znf.cif.gz"), "--out", str(tmp_path / "file"), "--quiet"]) == 2


def test_store_reads_without_biotite_gemmi_pyhmmer(built_store):
    """GPU-side code: the store and the loader work with the parsing libraries absent."""
    script = f"""
import sys
for name in ("biotite", "gemmi", "pyhmmer"):
    sys.modules[name] = None
from megafold.precache import open_store
from megafold.precache.loader import loader
store = open_store({str(built_store[0])!r})
assert store.verify() == []
batch = next(iter(loader(store, crop_size=16, batch_size=2, workers=0)))
print(tuple(batch["restype"].shape))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(2, 16)"


def test_one_builder_per_store(tmp_path, sources):
    import fcntl

    path = tmp_path / "store"
    path.mkdir()
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running build holds it
    try:
        with pytest.raises(CacheError, match="another build is running"):
            build([sources / "1znf.cif.gz"], path, search=False, progress=False)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_source", "megafold: error: {tmp}/missing.cif: no such file or directory"),
        ("out_under_a_file", "megafold: error: {tmp}/file/store: cannot create the store directory (Not a directory)"),
        ("workers_zero", "megafold precache: error: argument --workers: expected a positive integer, got 0"),
        ("workers_word", "megafold precache: error: argument --workers: expected a positive integer, got 'two'"),
        ("no_sources", "megafold precache: error: the following arguments are required: sources"),
    ],
)
def test_cli_user_errors_are_one_line_with_status_2(case, message, tmp_path, sources, capsys):
    from megafold.cli import main

    (tmp_path / "file").write_text("x")
    source, out = str(sources / "1znf.cif.gz"), str(tmp_path / "store")
    argv = {
        "missing_source": [str(tmp_path / "missing.cif"), "--out", out],
        "out_under_a_file": [source, "--out", str(tmp_path / "file" / "store")],
        "workers_zero": [source, "--out", out, "--workers", "0"],
        "workers_word": [source, "--out", out, "--workers", "two"],
        "no_sources": ["--out", out],
    }[case]
    try:
        status = main(["precache", *argv, "--no-search", "--quiet"])
    except SystemExit as exit:  # argparse
        status = exit.code
    err = capsys.readouterr().err
    assert status == 2
    assert err == message.format(tmp=tmp_path) + "\n"
    assert not (tmp_path / "store").exists()  # nothing was created


def test_build_rejects_zero_workers(tmp_path, sources):
    from megafold.errors import ConfigError

    with pytest.raises(ConfigError, match="workers must be a positive integer, got 0"):
        build([sources / "1znf.cif.gz"], tmp_path / "store", workers=0, search=False, progress=False)
    assert not (tmp_path / "store").exists()
