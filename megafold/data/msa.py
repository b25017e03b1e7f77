"""Multiple sequence alignments: jackhmmer search (pyhmmer), a3m / Stockholm I/O, pairing.

The search runs AF3's jackhmmer settings (one iteration, E 1e-4, at most 16,384 rows)
against a local FASTA database (by default the UniProt subset shipped in
``megafold/data/resources``) plus the chain sequences of the inputs. Self-hits (hits from
the query's own PDB entry) are removed. Multimer MSAs are paired by species (``OS=`` in
the UniProt headers) and the unpaired rest is stacked densely, as in AF3.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from megafold.files import atomic_open

MAX_MSA_ROWS = 16_384
JACKHMMER_OPTIONS = dict(max_iterations=1, E=1e-4, incE=1e-4, F1=5e-4, F2=5e-5, F3=5e-7)
_SPECIES = re.compile(r"\bOS=(.*?)(?:\s+[A-Z]{2}=|$)")
_MSA_SUFFIXES = (".a3m", ".a3m.gz", ".sto", ".sto.gz")


def default_sequence_db() -> Path:
    """The UniProt subset that ships with megafold (see resources/README.md)."""
    return Path(str(resources.files("megafold.data") / "resources" / "uniprot_20k.fasta.gz"))


@dataclass(frozen=True)
class Msa:
    """An MSA aligned to its query, as a3m rows: row 0 is the query.

    In a row, upper-case letters and '-' are the query positions; lower-case letters are
    residues the row inserts between them. ``rows`` ``[S, L]`` and ``deletions``
    ``[S, L]`` (inserted residues before each position) are derived from that.
    """

    aligned: tuple[str, ...]
    descriptions: tuple[str, ...]  # FASTA header after '>' (row 0: the query's)

    def __post_init__(self):
        if not self.aligned or len(self.aligned) != len(self.descriptions):
            raise ValueError("an MSA needs a query row and one description per row")
        self._matrices  # validates the column counts

    @property
    def depth(self) -> int:
        return len(self.aligned)

    @property
    def query(self) -> str:
        return self.aligned[0]

    @property
    def rows(self) -> np.ndarray:
        """[S, L] one upper-case letter (bytes) per query position, '-' for gaps."""
        return self._matrices[0]

    @property
    def deletions(self) -> np.ndarray:
        """[S, L] int32: residues the row inserts before each query position."""
        return self._matrices[1]

    @cached_property
    def _matrices(self) -> tuple[np.ndarray, np.ndarray]:
        length = sum(1 for c in self.aligned[0] if not c.islower())
        rows = np.full((self.depth, length), b"-", "S1")
        deletions = np.zeros((self.depth, length), np.int32)
        for r, text in enumerate(self.aligned):
            letters = np.frombuffer(text.encode(), np.uint8)
            is_insert = (letters >= ord("a")) & (letters <= ord("z"))
            match_letters = letters[~is_insert]
            if len(match_letters) != length:
                raise ValueError(
                    f"MSA row {r} ({self.descriptions[r][:40]!r}) has {len(match_letters)} query columns, "
                    f"the query has {length}"
                )
            rows[r] = match_letters.view("S1")
            inserts_before = np.cumsum(is_insert)[~is_insert]
            deletions[r] = np.diff(inserts_before, prepend=0)
        rows[rows == b"."] = b"-"
        return rows, deletions

    def species(self) -> list[str]:
        """OS= species of every row ('' where the header has none, always for row 0)."""
        found = [_SPECIES.search(d) for d in self.descriptions[1:]]
        return [""] + [m.group(1).strip() if m else "" for m in found]

    @classmethod
    def single(cls, query: str, description: str = "query") -> "Msa":
        """The query alone (chains without homologues, DNA/RNA chains)."""
        return cls((query,), (description,))

    def to_a3m(self) -> str:
        return "".join(f">{d}\n{a}\n" for d, a in zip(self.descriptions, self.aligned))

    def deduplicated(self, max_rows: int = MAX_MSA_ROWS) -> "Msa":
        """Drop rows that repeat an earlier row's query columns; keep at most ``max_rows``."""
        rows = self.rows
        _, first = np.unique(rows.view(f"S{rows.shape[1]}").ravel(), return_index=True)
        keep = np.sort(first)[: max(max_rows, 1)]
        return Msa(tuple(self.aligned[i] for i in keep), tuple(self.descriptions[i] for i in keep))


def parse_a3m(text: str) -> Msa:
    """Parse a3m text (FASTA; lower case = insertions, '-' = deletions)."""
    descriptions, aligned = [], []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(">"):
            descriptions.append(line[1:])
            aligned.append("")
        elif aligned:
            aligned[-1] += line
    if not aligned:
        raise ValueError("no sequences in a3m")
    return Msa(tuple(aligned), tuple(descriptions))


def read_msa(path: str | Path, query: str | None = None) -> Msa:
    """Read an a3m or Stockholm file (optionally gzipped).

    Stockholm alignments (jackhmmer / OpenFold output) carry the query columns in their
    ``#=GC RF`` line and do not contain the query itself: pass ``query`` to put it on row 0.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        text = raw.decode()
        msa = _read_stockholm(path, query) if text.lstrip().startswith("# STOCKHOLM") else parse_a3m(text)
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable MSA ({exc})") from exc
    if query is not None and msa.rows.shape[1] != len(query):
        raise ValueError(f"{path}: MSA has {msa.rows.shape[1]} query columns, the chain has {len(query)} residues")
    if query is not None and msa.query != query:
        return Msa((query, *msa.aligned), ("query", *msa.descriptions))
    return msa


def _read_stockholm(path: Path, query: str | None) -> Msa:
    import pyhmmer

    with pyhmmer.easel.MSAFile(str(path), format="stockholm") as msa_file:
        alignment = msa_file.read()
    if alignment is None:
        raise ValueError("empty Stockholm file")
    rf = alignment.reference
    rf = rf.decode() if isinstance(rf, bytes) else rf
    columns = alignment.alignment
    match = [c not in "-." for c in (rf or columns[0])]
    aligned = [
        "".join(
            (c.upper() if c not in "-." else "-") if is_match else c.lower()
            for c, is_match in zip(row, match)
            if is_match or c not in "-."
        )
        for row in columns
    ]
    descriptions = [f"{_text(s.name)} {_text(s.description)}".strip() for s in alignment.sequences]
    if query is not None:
        if sum(match) != len(query):
            raise ValueError(f"{sum(match)} match columns, the query has {len(query)} residues")
        aligned.insert(0, query)
        descriptions.insert(0, "query")
    return Msa(tuple(aligned), tuple(descriptions))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


def write_a3m(msa: Msa, path: str | Path) -> None:
    """Write ``msa`` as a3m atomically (temp file + rename)."""
    with atomic_open(path, "w") as handle:
        handle.write(msa.to_a3m())


def find_msa_file(msa_dir: str | Path, key: str, auth_chain_id: str) -> list[Path]:
    """Precomputed MSAs of one chain: ``{msa_dir}/{key}/{chain}.a3m`` (or .sto, gzipped) or
    every a3m/Stockholm file in the directory ``{msa_dir}/{key}/{chain}/``."""
    base = Path(msa_dir) / key
    for suffix in _MSA_SUFFIXES:
        if (base / f"{auth_chain_id}{suffix}").is_file():
            return [base / f"{auth_chain_id}{suffix}"]
    folder = base / auth_chain_id
    if folder.is_dir():
        return sorted(p for p in folder.iterdir() if p.name.endswith(_MSA_SUFFIXES))
    return []


def merge_msas(query: str, msas: Sequence[Msa], max_rows: int = MAX_MSA_ROWS) -> Msa:
    """One MSA from several searches of the same query (row 0 = query), deduplicated."""
    aligned, descriptions = [query], ["query"]
    for msa in msas:
        if msa.rows.shape[1] != len(query):
            raise ValueError(f"MSA has {msa.rows.shape[1]} columns, query has {len(query)}")
        aligned += msa.aligned
        descriptions += msa.descriptions
    return Msa(tuple(aligned), tuple(descriptions)).deduplicated(max_rows)


# ---------------------------------------------------------------- search


class SequenceDatabase:
    """A digital pyhmmer sequence block: a FASTA database plus extra named sequences."""

    def __init__(self, fasta: str | Path | None = None, extra: Mapping[str, str] | None = None):
        self.path = Path(fasta) if fasta is not None else default_sequence_db()
        self.extra = dict(extra or {})

    @cached_property
    def alphabet(self):
        import pyhmmer

        return pyhmmer.easel.Alphabet.amino()

    @cached_property
    def sequences(self):
        """The digital sequences, read on first use (a process that never searches never reads)."""
        import pyhmmer

        sequences = pyhmmer.easel.DigitalSequenceBlock(self.alphabet, list(_read_fasta_block(str(self.path))))
        for name, sequence in self.extra.items():
            text = pyhmmer.easel.TextSequence(name=name.encode(), sequence=_clean_protein(sequence))
            sequences.append(text.digitize(self.alphabet))
        return sequences

    def __len__(self) -> int:
        return len(self.sequences)


@lru_cache(maxsize=2)
def _read_fasta_block(path: str):
    import pyhmmer

    alphabet = pyhmmer.easel.Alphabet.amino()
    try:
        with pyhmmer.easel.SequenceFile(path, digital=True, alphabet=alphabet) as handle:
            return handle.read_block()
    except (OSError, ValueError, EOFError) as exc:
        raise FileNotFoundError(f"{path}: cannot read the sequence database ({exc})") from exc


def _clean_protein(sequence: str) -> str:
    return re.sub(r"[^ACDEFGHIKLMNPQRSTVWYX]", "X", sequence.upper())


def search_msa(
    query: str,
    database: SequenceDatabase,
    *,
    exclude_prefix: str | None = None,
    max_rows: int = MAX_MSA_ROWS,
) -> Msa:
    """jackhmmer ``query`` (one-letter protein) against ``database``; row 0 is the query.

    Every included domain becomes a row. Hits whose name starts with ``exclude_prefix``
    (the query's own PDB entry, e.g. "pdb|1abc_") are self-hits and dropped.
    """
    import pyhmmer

    query = _clean_protein(query)
    sequence = pyhmmer.easel.TextSequence(name=b"query", sequence=query).digitize(database.alphabet)
    (result,) = pyhmmer.hmmer.jackhmmer([sequence], database.sequences, cpus=1, **JACKHMMER_OPTIONS)
    aligned, descriptions = [query], ["query"]
    for hit in result.hits:
        if not hit.included:
            continue
        name = hit.name.decode() if isinstance(hit.name, bytes) else hit.name
        if exclude_prefix and name.startswith(exclude_prefix):
            continue
        description = hit.description or b""
        description = description.decode() if isinstance(description, bytes) else description
        for domain in hit.domains:
            if not domain.included:
                continue
            aligned.append(_domain_row(domain.alignment, len(query)))
            descriptions.append(f"{name} {description}".strip())
    return Msa(tuple(aligned), tuple(descriptions)).deduplicated(max_rows)


def _domain_row(alignment, query_length: int) -> str:
    """An a3m row from a domain alignment whose HMM positions are query positions."""
    hmm = alignment.hmm_sequence
    target = alignment.target_sequence
    out = ["-"] * (alignment.hmm_from - 1)
    for h, t in zip(hmm, target):
        if h == ".":  # target residue in an insert state
            out.append(t.lower())
        else:
            out.append(t.upper() if t != "-" else "-")
    out += ["-"] * (query_length - alignment.hmm_to)
    return "".join(out)


# ---------------------------------------------------------------- pairing


def pair_rows(msas: Sequence[Msa], entity_ids: Sequence[int], max_rows: int = MAX_MSA_ROWS) -> np.ndarray:
    """Row plan of a complex MSA: ``[R, C]`` row index into each chain's MSA, -1 = gap row.

    Row 0 is every chain's query. With two or more distinct entities, the next rows pair
    each species' best hit across the chains that have it (species in >= 2 entities).
    The unpaired remainder of each chain follows, stacked densely (row k holds every
    chain's k-th unpaired row). Copies of one entity share their rows.
    """
    n_chains = len(msas)
    plan = [[0] * n_chains]
    used: list[set[int]] = [set() for _ in range(n_chains)]
    if len(set(entity_ids)) > 1:
        best: list[dict[str, int]] = []
        for msa in msas:
            first: dict[str, int] = {}
            for r, species in enumerate(msa.species()):
                if r and species:
                    first.setdefault(species, r)
            best.append(first)
        entity_best: dict[int, dict[str, int]] = {}
        for entity, first in zip(entity_ids, best):
            entity_best.setdefault(entity, first)
        species_entities: dict[str, int] = {}
        species_rank: dict[str, int] = {}
        for first in entity_best.values():
            for species, r in first.items():
                species_entities[species] = species_entities.get(species, 0) + 1
                species_rank[species] = species_rank.get(species, 0) + r
        shared = [s for s, n in species_entities.items() if n >= 2]
        shared.sort(key=lambda s: (-species_entities[s], species_rank[s]))
        for species in shared:
            row = [first.get(species, -1) for first in best]
            plan.append(row)
            for c, r in enumerate(row):
                if r >= 0:
                    used[c].add(r)
    remaining = [[r for r in range(1, msa.depth) if r not in used[c]] for c, msa in enumerate(msas)]
    depth = max((len(r) for r in remaining), default=0)
    for k in range(depth):
        plan.append([rows[k] if k < len(rows) else -1 for rows in remaining])
    return np.asarray(plan[:max_rows], np.int64).reshape(-1, n_chains)
