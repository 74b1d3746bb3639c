"""Gene identity: loading the shipped tables, resolving genes through them, the coverage report.

What it does
------------
1. Loads the shipped gene tables in a fresh process (wall and CPU time).
2. Resolves ``--genes`` real GENCODE 48 human genes against a vocabulary of the other identifier
   type (symbols against an Ensembl-id vocabulary as Geneformer's, versioned Ensembl ids against a
   symbol vocabulary as scGPT's), and ``--genes`` Ensembl ids that are tokens as they are (exact);
   each twice (the second call reuses the per-vocabulary cache tokenize's blocks share).
3. ``cellkit.genes.coverage_report`` on a sparse ``--cells`` × ``--genes`` count matrix, in memory
   and from a backed ``.h5ad`` read in blocks.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/gene_identity.py [--genes 30000] [--cells 20000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOAD = (
    "import time; import numpy, pandas; c = time.process_time(); w = time.perf_counter();"
    "from cellkit.data._gene_tables import gene_tables; gene_tables();"
    "print(time.perf_counter() - w, time.process_time() - c)"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genes", type=int, default=30_000)
    parser.add_argument("--cells", type=int, default=20_000)
    args = parser.parse_args()

    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    import cellkit
    from cellkit import GeneVocab
    from cellkit.data._gene_tables import gene_tables
    from cellkit.data.genes import resolve_genes

    rows = []
    wall, cpu = map(float, subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True,
                                          check=True).stdout.split())  # fmt: skip
    rows.append(("load tables (fresh process)", "", f"{wall:.2f}", f"cpu {cpu:.2f} s"))
    tables = gene_tables()
    unique = [i for i in sorted(tables.human_symbol) if len(tables.human_ids[tables.human_symbol[i]]) == 1]
    ids = unique[: args.genes]  # genes whose symbol names one gene
    symbols = [tables.human_symbol[i] for i in ids]
    ens_vocab = GeneVocab([*ids, "<pad>"], specials={"pad": "<pad>"})
    sym_vocab = GeneVocab([*dict.fromkeys(symbols), "<pad>"], specials={"pad": "<pad>"})
    cases = [
        ("symbols -> Ensembl vocab", symbols, ens_vocab),
        ("Ensembl.v -> symbol vocab", [f"{i}.3" for i in ids], sym_vocab),
        ("exact (ids -> Ensembl vocab)", ids, ens_vocab),
    ]
    for name, genes, vocab in cases:
        for attempt in ("first", "again"):
            t = time.perf_counter()
            m = resolve_genes(genes, vocab)
            dt = time.perf_counter() - t
            rows.append((f"resolve: {name} ({attempt})", f"{m.coverage.n_matched:,}/{len(genes):,}", f"{dt:.2f}", ""))

    rng = np.random.default_rng(0)
    nnz_per_cell = 1_000
    indptr = np.arange(args.cells + 1, dtype=np.int64) * nnz_per_cell
    indices = np.sort(rng.integers(0, len(ids), size=(args.cells, nnz_per_cell)), axis=1).ravel()
    x = sp.csr_matrix((rng.poisson(2.0, size=len(indices)).astype(np.float32) + 1, indices, indptr),
                      shape=(args.cells, len(ids)))  # fmt: skip
    x.sum_duplicates()
    adata = ad.AnnData(X=x, var=pd.DataFrame(index=symbols))
    t = time.perf_counter()
    report = cellkit.genes.coverage_report(adata, ens_vocab, scheme="scgpt")
    rows.append(("coverage_report, in memory", f"{report.n_seen:,}/{report.n_genes:,}",
                 f"{time.perf_counter() - t:.2f}", f"unseen {report.unseen_share:.1%}"))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.h5ad"
        adata.write_h5ad(path)
        backed = ad.read_h5ad(path, backed="r")
        try:
            t = time.perf_counter()
            report = cellkit.genes.coverage_report(backed, ens_vocab, scheme="scgpt", chunk_size=4096)
            rows.append(("coverage_report, backed (4,096-cell blocks)", f"{report.n_seen:,}/{report.n_genes:,}",
                         f"{time.perf_counter() - t:.2f}", f"unseen {report.unseen_share:.1%}"))  # fmt: skip
        finally:
            backed.file.close()

    print(f"{args.genes:,} genes, {args.cells:,} cells × {nnz_per_cell:,} nonzeros")
    print(f"{'step':<48} {'matched':>15} {'seconds':>8}  note")
    for step, matched, seconds, note in rows:
        print(f"{step:<48} {matched:>15} {seconds:>8}  {note}")


if __name__ == "__main__":
    main()
