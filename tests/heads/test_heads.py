from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cellkit.heads import (
    AdversarialDiscriminator,
    ClassifierHead,
    DomainSpecificBatchNorm,
    ExpressionDecoder,
    MLMHead,
    MVCDecoder,
    grad_reverse,
    pool_cells,
)


def _mlp_by_hand(seq, x):
    lin = [m for m in seq if isinstance(m, torch.nn.Linear)]
    h = F.leaky_relu(x @ lin[0].weight.T + lin[0].bias, 0.01)
    h = F.leaky_relu(h @ lin[1].weight.T + lin[1].bias, 0.01)
    return (h @ lin[2].weight.T + lin[2].bias).squeeze(-1)


def test_expression_decoder_with_batch_labels_and_zero_prob():
    dec = ExpressionDecoder(8, explicit_zero_prob=True, use_batch_labels=True)
    h, be = torch.randn(2, 5, 8), torch.randn(2, 8)
    out = dec(h, be)
    cat = torch.cat([h, be[:, None, :].expand(2, 5, 8)], dim=2)
    torch.testing.assert_close(out["pred"], _mlp_by_hand(dec.fc, cat))
    torch.testing.assert_close(out["zero_probs"], torch.sigmoid(_mlp_by_hand(dec.zero_logit, cat)))
    assert dec.fc[0].weight.shape == (8, 16)
    with pytest.raises(ValueError, match="batch_embedding"):
        dec(h)


@pytest.mark.parametrize("use_batch", [False, True])
def test_mvc_inner_product(use_batch):
    dec = MVCDecoder(6, explicit_zero_prob=True, use_batch_labels=use_batch)
    cell, genes, be = torch.randn(3, 6), torch.randn(3, 4, 6), torch.randn(3, 6)
    out = dec(cell, genes, be)
    c = torch.cat([cell, be], 1) if use_batch else cell
    q = torch.sigmoid(genes @ dec.gene2query.weight.T + dec.gene2query.bias)
    expected = torch.einsum("bld,bd->bl", q @ dec.W.weight.T, c)
    torch.testing.assert_close(out["pred"], expected)
    z = torch.einsum("bld,bd->bl", q @ dec.W_zero_logit.weight.T + dec.W_zero_logit.bias, c)
    torch.testing.assert_close(out["zero_probs"], torch.sigmoid(z))
    assert dec.W.bias is None


def test_mvc_detach_blocks_gene_gradient():
    genes = torch.randn(2, 3, 4, requires_grad=True)
    MVCDecoder(4, detach=True)(torch.randn(2, 4), genes)["pred"].sum().backward()
    assert genes.grad is None
    MVCDecoder(4)(torch.randn(2, 4), genes)["pred"].sum().backward()
    assert genes.grad is not None


def test_classifier_structure_and_values():
    head = ClassifierHead(5, 3, n_layers=3)
    x = torch.randn(4, 5)
    h = x
    for i in range(2):
        lin, ln = head.layers[3 * i], head.layers[3 * i + 2]
        h = F.layer_norm(torch.relu(h @ lin.weight.T + lin.bias), (5,), ln.weight, ln.bias, 1e-5)
    torch.testing.assert_close(head(x), h @ head.out.weight.T + head.out.bias)


def test_gradient_reversal():
    x = torch.randn(3, 4, requires_grad=True)
    grad_reverse(x, 2.0).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3, 4), -2.0))
    disc = AdversarialDiscriminator(4, 2)
    x2 = torch.randn(3, 4, requires_grad=True)
    F.cross_entropy(disc(x2), torch.tensor([0, 1, 0])).backward()
    x3 = x2.detach().clone().requires_grad_(requires_grad=True)
    disc.reverse_grad = False
    F.cross_entropy(disc(x3), torch.tensor([0, 1, 0])).backward()
    torch.testing.assert_close(x2.grad, -x3.grad)


def test_dsbn_uses_first_label_for_whole_batch():
    bn = DomainSpecificBatchNorm(4, 3).eval()
    bn.bns[2].running_mean.fill_(1.0)
    bn.bns[2].running_var.fill_(4.0)
    x = torch.randn(2, 5, 4)
    out = bn(x, torch.tensor([2, 0]))
    torch.testing.assert_close(out, (x - 1.0) / torch.sqrt(torch.tensor(4.0 + 6.1e-5)))
    with pytest.raises(ValueError, match="outside"):
        bn(x, torch.tensor([3, 3]))


def test_mlm_head_tied_and_values():
    emb = torch.nn.Embedding(11, 6)
    head = MLMHead(6, 11, tie_to=emb, eps=1e-12)
    assert head.decoder.weight is emb.weight
    h = torch.randn(2, 3, 6)
    t = F.layer_norm(
        F.gelu(h @ head.dense.weight.T + head.dense.bias), (6,), head.norm.weight, head.norm.bias, 1e-12
    )
    torch.testing.assert_close(head(h), t @ emb.weight.T + head.bias)


def test_pooling_modes():
    h = torch.arange(2 * 4 * 2, dtype=torch.float32).view(2, 4, 2)
    mask = torch.tensor([[False, False, False, True], [False, False, False, False]])
    torch.testing.assert_close(pool_cells(h, mode="cls"), h[:, 0])
    torch.testing.assert_close(pool_cells(h, mode="mean", padding_mask=mask)[0], h[0, :3].mean(0))
    # Geneformer V2: exclude <cls> (first) and <eos> (each cell's last real token)
    special = torch.tensor([[True, False, True, False], [True, False, False, True]])
    got = pool_cells(h, mode="mean", padding_mask=mask, exclude_mask=special)
    torch.testing.assert_close(got[0], h[0, 1:2].mean(0))
    torch.testing.assert_close(got[1], h[1, 1:3].mean(0))
    vals = torch.tensor([[1.0, 2.0, 3.0, -2.0], [1.0, 1.0, 1.0, 1.0]])
    w = pool_cells(h, mode="weighted", padding_mask=mask, values=vals)
    torch.testing.assert_close(w[0], F.normalize((h[0, :3] * vals[0, :3, None]).sum(0), dim=0))
    with pytest.raises(ValueError, match="values"):
        pool_cells(h, mode="weighted")
