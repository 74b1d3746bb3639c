"""Counter-based hashing, the Collator (padding and the three masking modes) and scGPT mask parity."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cellkit._errors import DataError
from cellkit.data._hashing import cell_key, hash64, uniform_hash
from cellkit.data.collate import Collator, scgpt_random_mask_value
from cellkit.data.tokenized import TokenizedCells

SCGPT_CASES = Path(__file__).resolve().parents[1] / "fixtures" / "tokenize" / "scgpt" / "cases"
PAD, CLS, MASK = 100, 101, 102


def cell(n: int, *, key: int, seed: int = 0, types: bool = False) -> dict:
    """A scGPT-like cell: <cls> (value 0) then n - 1 genes with values 1 … 50."""
    rng = np.random.default_rng(seed + 1000 * key)
    ids = np.concatenate([[CLS], rng.choice(100, n - 1, replace=False)]).astype(np.int32)
    vals = np.concatenate([[0.0], rng.integers(1, 51, n - 1)]).astype(np.float32)
    item = {"gene_ids": ids, "values": vals, "index": key}
    if types:
        item["token_type_ids"] = np.arange(n, dtype=np.int32)
    return item


# ====================================================================================== hashing
def test_splitmix64_reference_values():
    # splitmix64 seeded with 0: first two outputs (Vigna's reference implementation)
    assert int(hash64(0)) == 0xE220A8397B1DCDAF
    assert int(hash64(0x9E3779B97F4A7C15)) == 0x6E789E6AA1B965F4


def test_uniform_hash_is_a_pure_function_and_pinned():
    u = uniform_hash(42, 0, 7, np.arange(3))
    # pinned: a change of algorithm changes every mask cellkit has ever made
    assert hash64(42, 0, 7, np.arange(3)).tolist() == [
        3205473498233206687,
        3921386610212246460,
        7023777444568184235,
    ]
    assert u.tolist() == [0.17376906653145752, 0.21257879409738423, 0.3807597382227754]
    np.testing.assert_array_equal(uniform_hash(42, 0, 7, np.arange(3)), u)
    assert uniform_hash(42, 0, 7, 1) == u[1]  # scalar and array keys agree
    assert uniform_hash(42, 7, 0, 1) != u[1]  # key order matters
    assert uniform_hash(43, 0, 7, 1) != u[1]
    # dtypes and signs: int32 / int64 / uint64 keys of the same value agree; -1 wraps like uint64 max
    a = uniform_hash(1, np.arange(5, dtype=np.int32))
    np.testing.assert_array_equal(a, uniform_hash(1, np.arange(5, dtype=np.uint64)))
    assert uniform_hash(1, -1) == uniform_hash(1, np.uint64(2**64 - 1))
    assert uniform_hash(0, np.zeros((3, 1), int), np.zeros((1, 4), int)).shape == (3, 4)
    with pytest.raises(TypeError):
        uniform_hash(0, np.array([0.5]))


def test_uniform_hash_is_roughly_uniform_and_decorrelated():
    u = uniform_hash(7, 3, np.arange(400)[:, None], np.arange(500)[None, :]).ravel()
    assert ((u >= 0) & (u < 1)).all()
    counts = np.histogram(u, bins=20, range=(0, 1))[0]
    expected = len(u) / 20
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 50  # 19 dof: p ~ 1e-4
    assert abs(u.mean() - 0.5) < 0.005
    # neighbouring keys are uncorrelated
    grid = u.reshape(400, 500)
    assert abs(np.corrcoef(grid[:, :-1].ravel(), grid[:, 1:].ravel())[0, 1]) < 0.01


def test_cell_key_is_stable_blake2b():
    assert int(cell_key("AAACCTGAGAAACCAT-1")) == 9210735210272742351
    keys = cell_key(np.array(["a", "b", "a"]))
    assert keys.dtype == np.uint64
    assert keys[0] == keys[2] != keys[1]
    assert cell_key(["x"])[0] == cell_key("x")


# ====================================================================================== padding
def test_padding_shapes_dtypes_and_keys_match_model_forward():
    items = [cell(5, key=0, types=True), cell(3, key=1, types=True)]
    items[0]["labels"], items[1]["labels"] = 2, 0
    items[0]["batch_labels"], items[1]["batch_labels"] = 1, 1
    batch = Collator(pad_id=PAD, pad_value=-2)(items)
    assert batch["gene_ids"].shape == (2, 5)
    assert batch["gene_ids"].dtype == torch.int64
    assert batch["values"].dtype == torch.float32
    assert batch["token_type_ids"].dtype == torch.int64
    assert batch["padding_mask"].dtype == torch.bool
    assert batch["gene_ids"][1].tolist()[3:] == [PAD, PAD]
    assert batch["values"][1].tolist()[3:] == [-2, -2]
    assert batch["token_type_ids"][1].tolist() == [0, 1, 2, 0, 0]
    assert batch["padding_mask"].tolist() == [[False] * 5, [False] * 3 + [True] * 2]
    assert batch["labels"].tolist() == [2, 0]
    assert batch["index"].tolist() == [0, 1]
    from cellkit.model import CellModel

    forward = set(inspect.signature(CellModel.forward).parameters)
    targets = {"labels", "index"}
    assert set(batch) - targets <= forward
    assert {"gene_ids", "values", "padding_mask", "token_type_ids", "batch_labels"} <= set(batch)


@pytest.mark.parametrize(
    ("max_len", "multiple", "width"),
    [(None, None, 7), (4, None, 4), (None, 8, 8), (6, 4, 6), (20, 4, 8), (None, 1, 7)],
)
def test_truncation_and_pad_to_multiple(max_len, multiple, width):
    items = [cell(7, key=0), cell(2, key=1)]
    out = Collator(pad_id=PAD, max_len=max_len, pad_to_multiple_of=multiple, return_tensors=False)(items)
    assert out["gene_ids"].shape == (2, width)
    assert isinstance(out["gene_ids"], np.ndarray)
    keep = min(7, width)
    np.testing.assert_array_equal(out["gene_ids"][0, :keep], items[0]["gene_ids"][:keep])  # from the end
    assert out["padding_mask"].sum(axis=1).tolist() == [width - keep, width - 2]


def test_pad_accepts_input_ids_and_torch_tensors():
    items = [{"input_ids": torch.tensor([5, 6, 7])}, {"input_ids": torch.tensor([8])}]
    out = Collator(pad_id=0)(items)
    assert out["gene_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert set(out) == {"gene_ids", "padding_mask"}


def test_collator_errors():
    with pytest.raises(DataError, match="empty"):
        Collator()([])
    with pytest.raises(DataError, match="every cell of a batch"):
        Collator()([cell(3, key=0), {"gene_ids": np.array([1, 2])}])
    with pytest.raises(DataError, match="must match"):
        Collator()([{"gene_ids": np.array([1, 2]), "values": np.array([1.0])}])
    with pytest.raises(DataError, match="stable key"):
        Collator(masking="values")([{"gene_ids": np.array([1, 2]), "values": np.array([1.0, 2.0])}])
    with pytest.raises(DataError, match="per-token values"):
        Collator(masking="values")([{"gene_ids": np.array([1, 2]), "index": 0}])
    with pytest.raises(DataError, match="Unknown masking"):
        Collator(masking="value")
    with pytest.raises(DataError, match="mask_ratio"):
        Collator(mask_ratio=1.5)
    with pytest.raises(DataError, match="needs mask_id, vocab_size"):
        Collator(masking="tokens")
    with pytest.raises(DataError, match="gene_type_offset"):
        Collator(masking="phenotypic", mask_id=1)
    with pytest.raises(DataError, match="exceeds 1"):
        Collator(
            masking="phenotypic", mask_id=1, gene_type_offset=2, n_gene_types=5, num_bins=1, bin_0_id=3,
            swap_sequence_prob=0.4,
        )  # fmt: skip
    with pytest.raises(DataError, match="no option"):
        Collator.for_tokens(_tokens(), mask_rati=0.2)


def _tokens() -> TokenizedCells:
    return TokenizedCells(
        gene_ids=np.arange(6, dtype=np.int32),
        offsets=np.array([0, 2, 6]),
        values=np.ones(6, np.float32),
        specials={"pad": 7, "cls": 8, "mask": 9},
        pad_value=-2.0,
        options={"vocab_size": 10, "num_bins": 3},
    )


def test_for_tokens_reads_specials_and_options():
    col = Collator.for_tokens(_tokens(), masking="tokens", mlm_probability=0.2)
    assert (col.pad_id, col.pad_value, col.mask_id, col.vocab_size, col.num_bins) == (7, -2.0, 9, 10, 3)
    assert col.special_ids == frozenset({7, 8, 9})
    assert col.mlm_probability == 0.2
    assert Collator.for_tokens(_tokens(), pad_id=0).pad_id == 0
    with pytest.raises(DataError, match="no pad token"):
        Collator.for_tokens(TokenizedCells(np.zeros(1, np.int32), np.array([0, 1])))


# ====================================================================================== values masking
def test_value_masking_hand_computed():
    item = cell(11, key=5)  # <cls> + 10 genes
    out = Collator(pad_id=PAD, pad_value=-2, masking="values", mask_ratio=0.25, seed=3, return_tensors=False)(
        [item, cell(4, key=6)]
    )
    # exactly int(10 * 0.25) = 2 masked: the two smallest hashes among positions 1 … 10
    u = uniform_hash(3, 0, 5, np.arange(11))
    expect = np.sort(1 + np.argsort(u[1:])[:2])
    np.testing.assert_array_equal(np.flatnonzero(out["mlm_mask"][0]), expect)
    assert (out["values"][0, expect] == -1).all()
    np.testing.assert_array_equal(out["target_values"][0], item["values"])
    untouched = np.setdiff1d(np.arange(11), expect)
    np.testing.assert_array_equal(out["values"][0, untouched], item["values"][untouched])
    # second cell: 3 eligible -> int(0.75) = 0 masked; padding never masked nor changed
    assert not out["mlm_mask"][1].any()
    assert (out["values"][1, 4:] == -2).all()


@pytest.mark.parametrize("keep", [0, 1, 3])
def test_value_masking_counts_and_exclusions(keep):
    items = [cell(n, key=k) for k, n in enumerate([1, 2, 9, 30, 51])]
    out = Collator(
        pad_id=PAD, masking="values", mask_ratio=0.4, keep_first_n_tokens=keep, return_tensors=False
    )(items)
    for row, item in enumerate(items):
        n = len(item["gene_ids"])
        assert out["mlm_mask"][row].sum() == int(max(n - keep, 0) * 0.4)
        assert not out["mlm_mask"][row, :keep].any()
        assert not out["mlm_mask"][row, n:].any()


def test_value_masking_bernoulli_rate():
    items = [cell(100, key=k) for k in range(50)]
    out = Collator(masking="values", mask_ratio=0.3, value_sampling="bernoulli", return_tensors=False)(items)
    rate = out["mlm_mask"][:, 1:].mean()
    assert 0.27 < rate < 0.33
    assert not out["mlm_mask"][:, 0].any()


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=2, max_size=8),
    perm_seed=st.integers(0, 2**16),
    mode=st.sampled_from(["values", "tokens"]),
)
def test_masks_do_not_depend_on_batch_order_or_composition(lengths, perm_seed, mode):
    items = [cell(n, key=k) for k, n in enumerate(lengths)]
    col = Collator(
        pad_id=PAD, masking=mode, mask_ratio=0.3, mlm_probability=0.3, mask_id=MASK, vocab_size=103,
        special_ids={PAD, CLS, MASK}, seed=11, return_tensors=False,
    )  # fmt: skip
    whole = col(items)
    perm = np.random.default_rng(perm_seed).permutation(len(items))
    half = perm[: max(1, len(perm) // 2)]
    for part in (perm, half):
        out = col([items[i] for i in part])
        for row, i in enumerate(part):
            n = lengths[i]
            for key in ("gene_ids", "values", "mlm_mask", "mlm_labels"):
                if key in out:
                    np.testing.assert_array_equal(out[key][row, :n], whole[key][i, :n])


def test_masks_change_with_epoch_and_seed_and_use_cell_key():
    items = [cell(60, key=k) for k in range(4)]
    col = Collator(masking="values", mask_ratio=0.3, return_tensors=False)
    m0 = col(items)["mlm_mask"]
    col.set_epoch(1)
    assert not np.array_equal(col(items)["mlm_mask"], m0)
    assert not np.array_equal(Collator(masking="values", seed=1, return_tensors=False)(items)["mlm_mask"], m0)
    # cell_key wins over index: same key, different index -> same mask
    a = dict(items[0], cell_key=-5, index=0)
    b = dict(items[0], cell_key=-5, index=99)
    out = Collator(masking="values", return_tensors=False)([a, b])
    np.testing.assert_array_equal(out["mlm_mask"][0], out["mlm_mask"][1])


# ====================================================================================== token masking
def test_token_masking_extremes_hand_computed():
    items = [
        {"gene_ids": np.array([CLS, 1, 2, 3, MASK, 4]), "index": 0},
        {"gene_ids": np.array([5, 6]), "index": 1},
    ]
    kw = {
        "pad_id": PAD,
        "mask_id": MASK,
        "vocab_size": 103,
        "special_ids": {PAD, CLS, MASK},
        "return_tensors": False,
    }
    out = Collator(masking="tokens", mlm_probability=1.0, replace_probs=(1.0, 0.0), **kw)(items)
    assert out["gene_ids"].tolist() == [[CLS, MASK, MASK, MASK, MASK, MASK], [MASK, MASK, PAD, PAD, PAD, PAD]]
    assert out["mlm_labels"].tolist() == [[-100, 1, 2, 3, -100, 4], [5, 6, -100, -100, -100, -100]]
    out = Collator(masking="tokens", mlm_probability=0.0, **kw)(items)
    assert (out["mlm_labels"] == -100).all()
    assert out["gene_ids"][0].tolist() == items[0]["gene_ids"].tolist()
    # all selected, none replaced by <mask>, all random: random ids are never specials
    out = Collator(masking="tokens", mlm_probability=1.0, replace_probs=(0.0, 1.0), **kw)(items)
    assert not np.isin(out["gene_ids"][0, 1:4], [PAD, CLS, MASK]).any()


def test_token_masking_rates_80_10_10():
    rng = np.random.default_rng(0)
    items = [{"gene_ids": np.concatenate([[CLS], rng.integers(0, 100, 199)]), "index": k} for k in range(100)]
    col = Collator(
        pad_id=PAD,
        masking="tokens",
        mask_id=MASK,
        vocab_size=103,
        special_ids={PAD, CLS, MASK},
        return_tensors=False,
    )
    orig = np.stack([it["gene_ids"] for it in items])
    out = col(items)
    selected = out["mlm_labels"] != -100
    assert not selected[:, 0].any()  # <cls> never
    np.testing.assert_array_equal(out["mlm_labels"][selected], orig[selected])
    assert 0.14 < selected[:, 1:].mean() < 0.16
    new = out["gene_ids"][selected]
    frac_mask = (new == MASK).mean()
    frac_same = (new == orig[selected]).mean()
    assert 0.78 < frac_mask < 0.82
    assert 0.08 < frac_same < 0.12 + 0.01  # the random 10 % lands on the original id 1 % of the time
    assert (out["gene_ids"][~selected] == orig[~selected]).all()
    assert ((new == MASK) | (new < 100)).all()  # random replacements are never specials


# ====================================================================================== phenotypic
OFFSET, N_GENES, BIN0, PMASK, PPAD = 4, 40, 3, 2, 1  # types: 0 special, 1-3 phenotype, >= 4 gene


def pg_cell(key: int, genes: np.ndarray, *, n_pheno: int = 3) -> dict:
    """[CLS] phenotype tokens (ids 10+c, type 1+c) gene bins (ids 20-23, type 4+g) [EOS]."""
    rng = np.random.default_rng(key)
    ids = [0] + [10 + c for c in range(n_pheno)] + list(20 + rng.integers(1, 4, len(genes))) + [5]
    types = [0] + [1 + c for c in range(n_pheno)] + list(OFFSET + genes) + [0]
    return {"gene_ids": np.array(ids), "token_type_ids": np.array(types), "index": key}


def pg_collator(**kw) -> Collator:
    base = {
        "pad_id": PPAD, "masking": "phenotypic", "mask_id": PMASK, "gene_type_offset": OFFSET,
        "n_gene_types": N_GENES, "num_bins": 3, "bin_0_id": BIN0, "return_tensors": False,
    }  # fmt: skip
    return Collator(**(base | kw))


def test_phenotypic_swaps_hand_computed():
    genes = np.array([0, 2])
    col = pg_collator(
        n_gene_types=5, num_bins=1, gene_mask_prob=1.0, swap_sequence_prob=0.5, phenotype_mask_prob=0.0
    )
    # swap fraction 1 / (1 + 1) / 0.5 = 1: every masked gene of a swapping cell gets an unexpressed gene
    keys = np.arange(40)
    swapping = uniform_hash(0, 0, keys, -1, 6) < 0.5  # the per-cell draw (stream 6)
    assert swapping.any()
    assert not swapping.all()
    out = col([pg_cell(int(k), genes) for k in keys])
    for row, k in enumerate(keys):
        g = out["token_type_ids"][row, 4:6] - OFFSET
        assert (out["gene_ids"][row, 4:6] == PMASK).all()
        if swapping[k]:
            assert set(g) <= {1, 3, 4}
            assert len(set(g)) == 2
            assert (out["mlm_labels"][row, 4:6] == BIN0).all()
        else:
            assert g.tolist() == [0, 2]
            assert (out["mlm_labels"][row, 4:6] >= 21).all()
        # specials and phenotypes untouched
        assert out["gene_ids"][row, [0, 1, 2, 3, 6]].tolist() == [0, 10, 11, 12, 5]
        assert (out["mlm_labels"][row, [0, 1, 2, 3, 6]] == -100).all()
    # only 3 unexpressed genes for 4 masked positions: 3 swapped, the 4th stays a plain mask
    many = pg_collator(n_gene_types=4, num_bins=1, gene_mask_prob=1.0, swap_sequence_prob=0.5)
    item = pg_cell(int(keys[swapping][0]), np.array([0]))
    item["gene_ids"] = np.concatenate([item["gene_ids"][:4], [21, 22, 23, 21], [5]])
    item["token_type_ids"] = np.concatenate(
        [item["token_type_ids"][:4], OFFSET + np.array([0, 0, 0, 0]), [0]]
    )
    out = many([item])
    assert (out["mlm_labels"][0, 4:8] == BIN0).sum() == 3


def test_phenotypic_rates_and_rules():
    rng = np.random.default_rng(1)
    items = [pg_cell(k, rng.choice(N_GENES, 30, replace=False)) for k in range(400)]
    col = pg_collator(gene_mask_prob=0.3)
    out = col(items)
    types_in = np.stack([it["token_type_ids"] for it in items])
    ids_in = np.stack([it["gene_ids"] for it in items])
    lab, ids, types = out["mlm_labels"], out["gene_ids"], out["token_type_ids"]
    gene = slice(4, 34)
    masked = ids[:, gene] == PMASK
    assert 0.28 < masked.mean() < 0.32
    swapped = lab[:, gene] == BIN0
    assert (masked | ~swapped).all()  # swaps are masked positions
    # swapped positions carry unexpressed genes, distinct within the cell; others keep their gene
    for r in range(len(items)):
        new = types[r, gene][swapped[r]]
        assert not np.isin(new, types_in[r, gene]).any()
        assert len(set(new)) == len(new)
        assert ((new >= OFFSET) & (new < OFFSET + N_GENES)).all()
        np.testing.assert_array_equal(types[r, gene][~swapped[r]], types_in[r, gene][~swapped[r]])
    np.testing.assert_array_equal(lab[:, gene][masked & ~swapped], ids_in[:, gene][masked & ~swapped])
    # in swapping cells (~90 %) a fraction 1 / (3 + 1) / 0.9 of masked genes is swapped
    cells_with_swap = swapped.any(axis=1).mean()
    assert 0.8 < cells_with_swap < 0.95
    frac = swapped.sum() / masked[swapped.any(axis=1)].sum()
    assert abs(frac - 1 / 4 / 0.9) < 0.04
    # phenotypes: half masked, a tenth of those dropped (pad id, type 0, no label)
    pheno_ids, pheno_types, pheno_lab = ids[:, 1:4], types[:, 1:4], lab[:, 1:4]
    dropped = pheno_ids == PPAD
    masked_p = (pheno_ids == PMASK) | dropped
    assert 0.45 < masked_p.mean() < 0.55
    assert 0.06 < dropped.sum() / masked_p.sum() < 0.14
    assert (pheno_types[dropped] == 0).all()
    assert (pheno_lab[dropped] == -100).all()
    np.testing.assert_array_equal(pheno_lab[masked_p & ~dropped], ids_in[:, 1:4][masked_p & ~dropped])
    assert not out["padding_mask"][:, 1:4].any()  # dropped tokens stay attended, as in PerturbGene
    # specials untouched
    assert (ids[:, 0] == 0).all()
    assert (ids[:, -1] == 5).all()
    assert (lab[:, [0, -1]] == -100).all()


def test_phenotypic_unexpressed_draw_large_gene_set():
    col = pg_collator(n_gene_types=60_000)
    expressed = np.arange(0, 60_000, 7)
    drawn = col._unexpressed(123, expressed, 500)
    assert len(set(drawn.tolist())) == 500
    assert not np.isin(drawn, expressed).any()
    np.testing.assert_array_equal(drawn, col._unexpressed(123, expressed, 500))
    assert len(col._unexpressed(1, np.arange(60_000), 5)) == 0


def test_phenotypic_needs_token_types():
    with pytest.raises(DataError, match="token_type_ids"):
        pg_collator()([{"gene_ids": np.array([1, 2]), "index": 0}])


# ====================================================================================== scGPT parity
def test_scgpt_random_mask_value_hand_computed():
    values = np.array([[0, 3, 0, 5, 7, 2, -2, -2], [0, 1, 2, 3, 4, 5, 6, 7]], dtype=np.float32)
    out = scgpt_random_mask_value(values, mask_ratio=0.5, pad_value=-2, rng=np.random.RandomState(7))
    assert out.dtype == np.float32
    assert values[0, 0] == 0
    # what scGPT does with the global generator, step by step
    np.random.seed(7)  # noqa: NPY002 - reproducing scGPT's use of the legacy global RNG
    expected = values.copy()
    for row in expected:
        idx = np.nonzero(row - (-2))[0]  # row 0: 6 eligible incl. <cls> and the zero gene
        row[np.random.choice(idx, int(len(idx) * 0.5), replace=False)] = -1  # noqa: NPY002
    np.testing.assert_array_equal(out, expected)
    assert (out == -1).sum(axis=1).tolist() == [3, 4]
    assert (out[0, 6:] == -2).all()
    # pinned positions for RandomState(7)
    assert np.flatnonzero(out[0] == -1).tolist() == np.flatnonzero(expected[0] == -1).tolist()
    with pytest.raises(DataError, match="RandomState"):
        scgpt_random_mask_value(values, rng=np.random.default_rng(0))


def _scgpt_cases() -> list[Path]:
    """Fixture cases whose scGPT call chain ends in ``random_mask_value``."""
    cases = sorted(SCGPT_CASES.glob("*/case.json")) if SCGPT_CASES.exists() else []
    return [
        p.parent for p in cases if "random_mask_value" in " ".join(json.loads(p.read_text())["call_order"])
    ]


@pytest.mark.skipif(not _scgpt_cases(), reason="scGPT tokenize fixtures not present")
@pytest.mark.parametrize("case_dir", _scgpt_cases(), ids=lambda p: p.name)
def test_scgpt_random_mask_value_matches_scgpt_fixtures(case_dir):
    case = json.loads((case_dir / "case.json").read_text())
    z = np.load(case_dir / "expected.npz")
    # replay the draws scGPT made before masking from the same np.random.seed: binning draws one
    # uniform per nonzero value of every non-empty cell; pad_batch samples rows longer than max_len
    rng = np.random.RandomState(case["seed"])
    for row in z["binned"]:
        nonzero = int((row > 0).sum())
        if nonzero:
            rng.rand(nonzero)
    width = case["padded_width"]
    for length in case["row_lengths_before_padding"]:
        if length > width:
            rng.choice(length - 1, width - 1, replace=False)
    out = scgpt_random_mask_value(z["values"], rng=rng, **case["mask_kwargs"])
    np.testing.assert_array_equal(out, z["masked_values"])


def test_collated_batch_feeds_cell_model_forward():
    from cellkit.data.synthetic import synthetic_vocab
    from cellkit.model import CellModel
    from cellkit.presets import scgpt_config

    vocab = synthetic_vocab(40)
    model = CellModel(scgpt_config(vocab, d_model=16, n_heads=2, n_layers=1, d_ff=24), vocab).eval()
    rng = np.random.default_rng(0)
    items = [
        {
            "gene_ids": np.concatenate([[vocab.cls_id], rng.choice(40, n - 1, replace=False)]),
            "values": np.concatenate([[-2.0], rng.integers(1, 51, n - 1)]).astype(np.float32),
            "index": i,
        }
        for i, n in enumerate([5, 9, 2])
    ]
    batch = Collator(pad_id=vocab.pad_id, pad_value=-2, masking="values", pad_to_multiple_of=4)(items)
    forward = set(inspect.signature(model.forward).parameters)
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k in forward})
    assert torch.isfinite(out.last_hidden_state).all()
    assert out.last_hidden_state.shape[:2] == (3, 12)
