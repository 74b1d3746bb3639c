from __future__ import annotations

import json

import numpy as np
import pytest

from cellkit import GeneVocab, UnknownGeneError, VocabError


def test_from_dict_sorts_by_id_any_key_order():
    v = GeneVocab.from_dict({"B": 1, "<pad>": 2, "A": 0}, specials={"pad": "<pad>"})
    assert v.tokens == ["A", "B", "<pad>"]
    assert v.pad_id == 2
    assert v["B"] == 1
    assert v.token(0) == "A"


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"A": 0, "B": 2}, "not contiguous"),
        ({"A": 1, "B": 2}, "not contiguous"),
        ({"A": 0, "B": 0}, "Duplicate ids"),
        ({"A": 0, "B": "1"}, "non-integer"),
        ({}, "empty"),
    ],
)
def test_bad_vocab_dicts(mapping, message):
    with pytest.raises(VocabError, match=message):
        GeneVocab.from_dict(mapping)


def test_duplicate_tokens_and_bad_specials():
    with pytest.raises(VocabError, match="Duplicate tokens"):
        GeneVocab(["A", "A"])
    with pytest.raises(VocabError, match="not in the vocabulary"):
        GeneVocab(["A"], specials={"pad": "<pad>"})
    with pytest.raises(VocabError, match="role"):
        GeneVocab(["A"], specials={"padding": "A"})
    with pytest.raises(VocabError, match="no 'cls' token"):
        _ = GeneVocab(["A"]).cls_id


def test_unknown_genes_never_map_to_pad():
    v = GeneVocab(["A", "B", "<pad>"], specials={"pad": "<pad>"})
    with pytest.raises(UnknownGeneError, match="'Z' is not in the vocabulary"):
        v["Z"]
    with pytest.raises(UnknownGeneError, match="1 of 3 genes"):
        v.lookup(["A", "Z", "B"])
    np.testing.assert_array_equal(v.lookup(["A", "Z", "B"], unknown="missing"), [0, -1, 1])


def test_coverage_report():
    v = GeneVocab(["A", "B", "C", "<pad>"], specials={"pad": "<pad>"})
    cov = v.coverage(["A", "X", "C", "<pad>", "Y"])
    assert (cov.n_genes, cov.n_matched, cov.n_unmatched) == (5, 2, 3)
    assert cov.unmatched_examples == ("X", "<pad>", "Y")
    assert "2 of 5 genes" in str(cov)


def test_json_round_trip_and_errors(tmp_path):
    v = GeneVocab(["A", "B", "<pad>"], specials={"pad": "<pad>"})
    path = tmp_path / "vocab.json"
    v.to_json(path)
    assert json.loads(path.read_text()) == {"A": 0, "B": 1, "<pad>": 2}
    assert GeneVocab.from_json(path, specials={"pad": "<pad>"}) == v
    assert list(tmp_path.iterdir()) == [path], "atomic write leaves no temporary files"
    with pytest.raises(VocabError, match="does not exist"):
        GeneVocab.from_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(VocabError, match="not valid JSON"):
        GeneVocab.from_json(tmp_path / "bad.json")
    (tmp_path / "gap.json").write_text('{"A": 0, "B": 5}')
    with pytest.raises(VocabError, match=r"gap\.json.*contiguous"):
        GeneVocab.from_json(tmp_path / "gap.json")


def test_with_specials_appends_missing():
    v = GeneVocab(["A", "B"]).with_specials(
        {"pad": "<pad>", "cls": "<cls>", "eos": "<eoc>"}, append_missing=True
    )
    assert v.tokens == ["A", "B", "<pad>", "<cls>", "<eoc>"]
    assert v.special_ids == [2, 3, 4]
