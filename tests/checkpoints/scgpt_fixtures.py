"""Rebuild the scGPT golden-fixture checkpoints (tests/fixtures/scgpt) in scGPT's own layout."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from functools import cache
from pathlib import Path

import numpy as np
import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "scgpt"


@cache
def weight_rule():
    spec = importlib.util.spec_from_file_location("scgpt_weight_rule", FIXTURES / "weight_rule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def case(name: str) -> dict:
    return json.loads((FIXTURES / "cases" / name / "case.json").read_text())


def expected(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "cases" / name / "expected.npz") as f:
        return {k: f[k] for k in f.files}


def build_checkpoint(name: str, directory: Path, *, naming: str = "Wqkv", check_hashes: bool = True) -> Path:
    """Write args.json, vocab.json and best_model.pt for a case, weights rebuilt by the documented rule."""
    wr, c = weight_rule(), case(name)
    state = wr.fill_state_dict(wr.shapes_from_case(c), c["seed"])
    if check_hashes:
        for key, digest in c["weight_sha256"].items():
            t = state[key]
            got = hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()
            assert got == digest, f"weight rule did not reproduce {key}"
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(wr.rename_attention(state, naming), directory / "best_model.pt")
    (directory / "args.json").write_text((FIXTURES / "cases" / name / "args.json").read_text())
    (directory / "vocab.json").write_text(json.dumps(wr.synthetic_vocab(c["n_genes"]), indent=2))
    return directory
