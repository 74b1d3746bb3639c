"""The typed input contract (issue 16 item 3): ``InputSpec`` in ``CellModelConfig.input``.

One validated dataclass holds a model's tokenization conventions; configs written by earlier
cellkit versions (a free dict with each family's spelling of the maximum length) still load, and
every scheme records the effective maximum length under one name.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import warnings

import numpy as np
import pytest

import cellkit
from cellkit import CellModelConfig, ConfigError, InputSpec
from cellkit.data.input_spec import LEGACY_MAX_LENGTH_KEYS

from .test_presets import EDGES, GENES, PHENOTYPES, TINY, counts_adata

MEDIANS = {g: 1.0 + i / 10 for i, g in enumerate(GENES)}


def quiet_tokenize(adata, model, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return cellkit.tokenize(adata, model, progress=False, **options)


# ================================================================================ the dataclass
def test_fields_are_typed_and_unstated_fields_are_left_out():
    spec = InputSpec(max_length=1200, n_bins=51, pad_value=-2.0, cls_value=-2.0, mask_value=-1.0)
    assert spec.to_dict() == {
        "max_length": 1200,
        "n_bins": 51,
        "pad_value": -2.0,
        "cls_value": -2.0,
        "mask_value": -1.0,
    }
    assert InputSpec.from_dict(spec.to_dict()) == spec
    assert InputSpec().to_dict() == {}
    edges = InputSpec(bin_edges=[0.5, 2.0], gene_type_offset=3, n_gene_types=40)
    assert edges.bin_edges == (0.5, 2.0)  # immutable
    assert edges.to_dict()["bin_edges"] == [0.5, 2.0]  # JSON-able
    assert InputSpec.from_dict(json.loads(json.dumps(edges.to_dict()))) == edges
    # numpy scalars become Python values; an int target sum stays an int (scGPT's median quirk)
    spec = InputSpec(max_length=np.int64(8), normalize_total=10_000, use_raw=np.True_)
    assert type(spec.max_length) is int and type(spec.normalize_total) is int and spec.use_raw is True


def test_frozen():
    spec = InputSpec(n_bins=51)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.n_bins = 3  # type: ignore[misc]
    assert dataclasses.replace(spec, use_raw=True) == InputSpec(n_bins=51, use_raw=True)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_length", 0),
        ("max_length", 1.5),
        ("max_length", True),
        ("n_bins", -1),
        ("n_bins", "51"),
        ("pad_value", float("nan")),
        ("cls_value", "x"),
        ("mask_value", [1]),
        ("normalize_total", 0),
        ("normalize_total", True),
        ("normalize_total", -1e4),
        ("log1p", 1),
        ("use_raw", "yes"),
        ("special_token", 0),
        ("version", "V3"),
        ("bin_edges", [2.0, 1.0]),
        ("bin_edges", []),
        ("bin_edges", "0.5"),
        ("gene_type_offset", 0),
        ("n_gene_types", 0),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"InputSpec\.{field}"):
        InputSpec(**{field: value})


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match=r"Unknown InputSpec keys \['max_tokens', 'nbins'\]"):
        InputSpec.from_dict({"nbins": 51, "max_tokens": 3})
    with pytest.raises(ConfigError, match="object"):
        InputSpec.from_dict(["n_bins"])  # type: ignore[arg-type]


# ======================================================================== configs of earlier versions
#: ``config.input`` as earlier cellkit versions wrote it, per family, and what it reads as
LEGACY = {
    "scgpt checkpoint": (
        {
            "n_bins": 51,
            "pad_value": -2,
            "mask_value": -1,
            "cls_value": -2,
            "input_style": "binned",
            "max_len": 1200,
            "n_layers_cls": 3,
        },
        InputSpec(max_length=1200, n_bins=51, pad_value=-2, mask_value=-1, cls_value=-2),
    ),
    "scgpt checkpoint, no max_seq_len": (
        {
            "n_bins": 51,
            "pad_value": -2,
            "mask_value": -1,
            "cls_value": -2,
            "input_style": "binned",
            "max_len": None,
        },
        InputSpec(n_bins=51, pad_value=-2, mask_value=-1, cls_value=-2),
    ),
    "geneformer": (
        {"version": "V2", "model_input_size": 4096, "special_token": True},
        InputSpec(version="V2", max_length=4096, special_token=True),
    ),
    "teddy-style": ({"max_seq_len": 2048}, InputSpec(max_length=2048)),
    "perturbgene": (
        {"gene_type_offset": 3, "n_gene_types": 40, "bin_edges": EDGES, "max_length": 20},
        InputSpec(gene_type_offset=3, n_gene_types=40, bin_edges=EDGES, max_length=20),
    ),
    "demo model": (
        {
            "cls_value": -2.0,
            "log1p": False,
            "mask_value": -1.0,
            "n_bins": 51,
            "normalize_total": None,
            "pad_value": -2.0,
            "use_raw": True,
        },
        InputSpec(
            cls_value=-2.0,
            log1p=False,
            mask_value=-1.0,
            n_bins=51,
            normalize_total=False,
            pad_value=-2.0,
            use_raw=True,
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(LEGACY))
def test_legacy_input_dicts_are_read(case):
    old, new = LEGACY[case]
    assert InputSpec.from_dict(old) == new
    assert InputSpec.from_dict(new.to_dict()) == new  # and what cellkit writes now reads back the same


def test_legacy_max_length_spellings_must_agree():
    assert set(LEGACY_MAX_LENGTH_KEYS) == {"max_len", "model_input_size", "max_seq_len"}
    assert InputSpec.from_dict({"max_len": 8, "max_length": 8}).max_length == 8
    with pytest.raises(ConfigError, match="twice with different values"):
        InputSpec.from_dict({"model_input_size": 2048, "max_length": 4096})


def test_old_style_model_config_dict_loads():
    model = cellkit.presets.build_model(GENES, family="scgpt", seed=0, **TINY)
    old = model.config.to_dict()
    old["input"] = copy.deepcopy(LEGACY["scgpt checkpoint"][0])
    config = CellModelConfig.from_dict(old)
    assert config.input == LEGACY["scgpt checkpoint"][1]
    assert config.to_dict()["input"] == {
        "max_length": 1200,
        "n_bins": 51,
        "pad_value": -2,
        "mask_value": -1,
        "cls_value": -2,
    }
    old["input"]["n_bins"] = -3
    with pytest.raises(ConfigError, match=r"Field 'input': InputSpec\.n_bins"):
        CellModelConfig.from_dict(old)
    with pytest.raises(ConfigError, match="input must be an InputSpec"):
        CellModelConfig(encoder=config.encoder, input="binned")  # type: ignore[arg-type]


def test_a_saved_model_of_an_earlier_version_loads_and_tokenizes_the_same(tmp_path):
    """The demo model's config.json with the input dict an earlier cellkit wrote gives the same tokens."""
    from cellkit.datasets import DEMO_TOKENIZE_OPTIONS, demo_model_path, pbmc_demo

    old_dir = tmp_path / "old"
    shutil.copytree(demo_model_path(), old_dir)
    doc = json.loads((old_dir / "config.json").read_text())
    doc["model"]["input"] = dict(LEGACY["demo model"][0], max_len=None, input_style="binned", n_layers_cls=3)
    (old_dir / "config.json").write_text(json.dumps(doc))
    old, new = cellkit.load_model(old_dir), cellkit.datasets.demo_model()
    assert old.config.input == new.config.input
    adata = pbmc_demo()[:40]
    a = quiet_tokenize(adata, old, **DEMO_TOKENIZE_OPTIONS)
    b = quiet_tokenize(adata, new, **DEMO_TOKENIZE_OPTIONS)
    np.testing.assert_array_equal(a.gene_ids, b.gene_ids)
    np.testing.assert_array_equal(a.values, b.values)
    assert a.options["normalize_total"] is None  # the model's "not normalised" convention applied


# ========================================================================= one name for the length
def test_every_scheme_records_max_length():
    adata = counts_adata()
    scgpt = cellkit.presets.build_model(GENES, family="scgpt", seed=0, **TINY)
    assert quiet_tokenize(adata, scgpt).max_length is None  # scGPT keeps every gene
    assert quiet_tokenize(adata, scgpt, max_len=9).max_length == 9
    gf = cellkit.presets.build_model(
        GENES,
        family="geneformer",
        seed=0,
        version="V2",
        max_len=12,
        resources={"gene_median": MEDIANS},
        **TINY,
    )
    assert gf.config.input.max_length == 12
    tokens = quiet_tokenize(adata, gf)
    assert tokens.max_length == tokens.options["model_input_size"] == 12
    assert tokens.lengths.max() <= 12
    assert quiet_tokenize(adata, gf, model_input_size=6).max_length == 6
    teddy = quiet_tokenize(adata, gf, scheme="teddy")
    assert teddy.max_length == teddy.options["max_seq_len"] == 12  # the model's max_length
    pg = cellkit.presets.build_model(
        GENES, family="perturbgene", phenotypes=PHENOTYPES, bin_edges=EDGES, max_length=10, seed=0, **TINY
    )
    tokens = quiet_tokenize(adata, pg, phenotype_columns=["cell_type"])
    assert tokens.max_length == 10 and tokens.lengths.max() <= 10


def test_shards_report_max_length(tmp_path):
    gf = cellkit.presets.build_model(
        GENES,
        family="geneformer",
        seed=0,
        version="V1",
        max_len=7,
        resources={"gene_median": MEDIANS},
        **TINY,
    )
    shards = quiet_tokenize(counts_adata(), gf, output=tmp_path / "shards")
    assert shards.max_length == 7
    assert cellkit.open_shards(tmp_path / "shards").max_length == 7


def test_max_length_is_an_option_of_every_scheme():
    """``max_length`` means the same in every scheme; the upstream name is the same option."""
    adata = counts_adata()
    scgpt = cellkit.presets.build_model(GENES, family="scgpt", seed=0, **TINY)
    gf = cellkit.presets.build_model(
        GENES,
        family="geneformer",
        seed=0,
        version="V2",
        max_len=12,
        resources={"gene_median": MEDIANS},
        **TINY,
    )
    for model, scheme, own in (
        (scgpt, "scgpt", "max_len"),
        (gf, "geneformer", "model_input_size"),
        (gf, "teddy", "max_seq_len"),
    ):
        a = quiet_tokenize(adata, model, scheme=scheme, max_length=6)
        b = quiet_tokenize(adata, model, scheme=scheme, **{own: 6})
        np.testing.assert_array_equal(a.gene_ids, b.gene_ids)
        np.testing.assert_array_equal(a.offsets, b.offsets)
        assert a.max_length == b.max_length == a.options[own] == 6
        assert quiet_tokenize(adata, model, scheme=scheme, max_length=6, **{own: 6}).max_length == 6
        with pytest.raises(cellkit.DataError, match=rf"{own}=5 and max_length=6"):
            quiet_tokenize(adata, model, scheme=scheme, max_length=6, **{own: 5})


def test_repr_shows_the_stated_fields():
    assert repr(InputSpec(n_bins=51, use_raw=True)) == "InputSpec(n_bins=51, use_raw=True)"
    assert repr(InputSpec()) == "InputSpec()"


def test_preprocessing_options_are_scheme_option_values():
    assert InputSpec().preprocessing_options() == {}
    assert InputSpec(normalize_total=False, log1p=False).preprocessing_options() == {
        "normalize_total": None,  # the scheme's "no normalisation"
        "log1p": False,
    }
    assert InputSpec(normalize_total=1e4, log1p=True).preprocessing_options() == {
        "normalize_total": 1e4,
        "log1p": True,
    }
