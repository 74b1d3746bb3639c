from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from cellkit.core import EncoderConfig


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 - seeds code under test that may use the legacy global RNG
    torch.manual_seed(0)
    return


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (tiny models: steadier, and a fixed reduction order for the
    bit-identical resume / rerun comparisons); the thread count is put back afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_config() -> EncoderConfig:
    """Odd sizes catch shape bugs (HF ModelTester style)."""
    return EncoderConfig(
        vocab_size=53, d_model=24, n_heads=3, n_layers=2, d_ff=37, pad_token_id=50, dropout=0.1
    )


def random_batch(config: EncoderConfig, lengths: list[int], *, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(0, config.pad_token_id or config.vocab_size, (len(lengths), width), generator=g)
    values = torch.randint(1, 51, (len(lengths), width), generator=g).float()
    mask = torch.arange(width)[None, :] >= torch.tensor(lengths)[:, None]
    if config.pad_token_id is not None:
        ids[mask] = config.pad_token_id
    values[mask] = float(config.value_pad_id) if config.value_encoder == "category" else -2.0
    return {"gene_ids": ids, "values": values, "padding_mask": mask}
