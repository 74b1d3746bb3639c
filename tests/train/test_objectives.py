"""Every training objective against a hand computation on a tiny batch (value and gradient).

The expected numbers are computed with plain Python (``math`` and loops over nested lists), never
with the torch function the implementation calls. Definitions: scGPT 0.2.4 ``scgpt/loss.py`` and
``TransformerModel.forward`` (ECS, CCE), see the module docstring of ``cellkit.train.objectives``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import cellkit
from cellkit.train import (
    CCE,
    DAB,
    ECS,
    MVC,
    OBJECTIVES,
    Classification,
    MaskedTokenLM,
    MaskedValueMSE,
    MVCZeroProbNLL,
    Objective,
    ZeroProbNLL,
    make_objectives,
)
from cellkit.train.objectives import masked_mse, neg_log_bernoulli

TOL = 1e-6
D = torch.float64

# ---------------------------------------------------------------------------------------------
# helpers


def _out(**fields):
    """A model-output-like object: every CellModelOutput head field, None unless given."""
    names = (
        "class_logits",
        "expression",
        "expression_zero_probs",
        "mvc",
        "mvc_zero_probs",
        "cell_embedding",
        "batch_logits",
        "token_logits",
    )
    return SimpleNamespace(**{n: fields.get(n) for n in names})


def _leaf(rows, dtype=D):
    return torch.tensor(rows, dtype=dtype, requires_grad=True)


def _close(actual, expected, tol=TOL):
    """Scalar tensor vs float, or tensor vs nested list, elementwise within ``tol``."""
    a = torch.as_tensor(actual).detach().to(torch.float64)
    e = torch.tensor(expected, dtype=torch.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    assert torch.all((a - e).abs() <= tol), (a, e)


def _log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _softmax(row):
    return [math.exp(v) for v in _log_softmax(row)]


def _norm(v):
    return math.sqrt(sum(x * x for x in v))


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def _unit(v):
    n = _norm(v)
    return [x / n for x in v]


def _zeros_like(rows):
    return [[0.0] * len(r) for r in rows]


# Tiny value batch, B=2, L=4. Unmasked targets hold values (pad -2, a huge number) that would
# change the result if the mask were not applied.
PRED = [[1.0, 2.0, -0.5, 3.0], [0.5, 0.0, 1.5, -1.0]]
TARGET = [[1.5, -2.0, 0.0, 100.0], [0.0, 4.0, 1.0, -2.0]]
MASK = [[True, False, True, False], [False, True, True, False]]
PROBS = [[0.9, 0.2, 0.6, 0.5], [0.3, 0.7, 0.1, 0.95]]


def _value_batch(mask=MASK):
    return {"target_values": torch.tensor(TARGET, dtype=D), "mlm_mask": torch.tensor(mask)}


def _hand_masked_mse(pred, target, mask):
    sq, n = 0.0, 0
    grad = _zeros_like(pred)
    for i, row in enumerate(pred):
        for j, p in enumerate(row):
            if mask[i][j]:
                sq += (p - target[i][j]) ** 2
                n += 1
    for i, row in enumerate(pred):
        for j, p in enumerate(row):
            if mask[i][j]:
                grad[i][j] = 2.0 * (p - target[i][j]) / n
    return sq / n, grad


def _hand_bernoulli_nll(probs, target, mask):
    nll, n = 0.0, 0
    for i, row in enumerate(probs):
        for j, p in enumerate(row):
            if mask[i][j]:
                nll += -math.log(p) if target[i][j] > 0 else -math.log(1.0 - p)
                n += 1
    grad = _zeros_like(probs)
    for i, row in enumerate(probs):
        for j, p in enumerate(row):
            if mask[i][j]:
                grad[i][j] = (-1.0 / p if target[i][j] > 0 else 1.0 / (1.0 - p)) / n
    return nll / n, grad


def _hand_ce(logits, labels, *, smoothing=0.0, weights=None, ignore=-100):
    """torch.nn.CrossEntropyLoss semantics (mean), value and d loss / d logits, by hand."""
    n_cls = len(logits[0])
    w = weights or [1.0] * n_cls
    num, den = 0.0, 0.0
    grad = _zeros_like(logits)
    for y in labels:
        if y != ignore:
            den += w[y]
    for i, (row, y) in enumerate(zip(logits, labels)):
        if y == ignore:
            continue
        lp = _log_softmax(row)
        p = [math.exp(v) for v in lp]
        num += (1 - smoothing) * w[y] * -lp[y] + smoothing / n_cls * sum(-w[c] * lp[c] for c in range(n_cls))
        # d/dz_k of  (1-e) w_y (-log p_y) + e/C Σ_c w_c (-log p_c)
        sw = sum(w)
        for k in range(n_cls):
            g = (1 - smoothing) * w[y] * (p[k] - (k == y)) + smoothing / n_cls * (sw * p[k] - w[k])
            grad[i][k] = g / den
    return num / den, grad


# ---------------------------------------------------------------------------------------------
# masked MSE (GEP, MVC)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_mse_helper_value_and_grad(dtype):
    pred = _leaf(PRED, dtype)
    loss = masked_mse(pred, torch.tensor(TARGET, dtype=dtype), torch.tensor(MASK))
    expected, grad = _hand_masked_mse(PRED, TARGET, MASK)
    # (1-1.5)² + (-0.5-0)² + (0-4)² + (1.5-1)² = 0.25 + 0.25 + 16 + 0.25, over 4 masked
    assert expected == pytest.approx(16.75 / 4)
    _close(loss, expected, 1e-6 if dtype == D else 1e-5)
    loss.backward()
    _close(pred.grad, grad, 1e-6)


@pytest.mark.parametrize(("cls", "field"), [(MaskedValueMSE, "expression"), (MVC, "mvc")])
def test_masked_value_objectives_value_grad_and_descent(cls, field):
    pred = _leaf(PRED)
    loss = cls()(_out(**{field: pred}), _value_batch())
    expected, grad = _hand_masked_mse(PRED, TARGET, MASK)
    _close(loss, expected)
    loss.backward()
    _close(pred.grad, grad)
    # unmasked positions get no gradient; masked ones point from target to prediction
    assert pred.grad[0, 1] == 0
    assert pred.grad[0, 3] == 0
    assert pred.grad[1, 3] == 0
    assert pred.grad[1, 1] < 0  # pred 0 < target 4: increasing pred lowers the loss
    stepped = [[p - 0.1 * g for p, g in zip(r, gr)] for r, gr in zip(PRED, grad)]
    assert _hand_masked_mse(stepped, TARGET, MASK)[0] < expected


# ---------------------------------------------------------------------------------------------
# Bernoulli NLL of the zero probabilities


def test_neg_log_bernoulli_helper_value_and_grad():
    probs = _leaf(PROBS)
    loss = neg_log_bernoulli(probs, torch.tensor(TARGET, dtype=D), torch.tensor(MASK))
    expected, grad = _hand_bernoulli_nll(PROBS, TARGET, MASK)
    # masked: (0,0) t>0 p=.9; (0,2) t=0 p=.6; (1,1) t>0 p=.7; (1,2) t>0 p=.1
    by_hand = -(math.log(0.9) + math.log(0.4) + math.log(0.7) + math.log(0.1)) / 4
    assert expected == pytest.approx(by_hand)
    _close(loss, expected)
    loss.backward()
    pred_grad = probs.grad
    _close(pred_grad, grad)
    # non-zero target: raising p lowers the loss; zero target: raising p raises it
    assert pred_grad[0, 0] < 0
    assert pred_grad[1, 2] < 0
    assert pred_grad[0, 2] > 0
    assert pred_grad[0, 1] == 0
    assert pred_grad[1, 0] == 0


@pytest.mark.parametrize(
    ("cls", "field"), [(ZeroProbNLL, "expression_zero_probs"), (MVCZeroProbNLL, "mvc_zero_probs")]
)
def test_zero_prob_objectives_value_and_grad(cls, field):
    probs = _leaf(PROBS)
    loss = cls()(_out(expression=torch.zeros(2, 4), mvc=torch.zeros(2, 4), **{field: probs}), _value_batch())
    expected, grad = _hand_bernoulli_nll(PROBS, TARGET, MASK)
    _close(loss, expected)
    loss.backward()
    _close(probs.grad, grad)


def test_zero_prob_objectives_need_explicit_zero_prob():
    out = _out(expression=torch.zeros(2, 4), mvc=torch.zeros(2, 4))
    with pytest.raises(cellkit.ConfigError, match="explicit_zero_prob"):
        ZeroProbNLL()(out, _value_batch())
    with pytest.raises(cellkit.ConfigError, match="explicit_zero_prob"):
        MVCZeroProbNLL()(out, _value_batch())


# ---------------------------------------------------------------------------------------------
# nothing masked / everything ignored: exactly 0, not NaN, still on the graph


def _empty_cases():
    nomask = [[False] * 4, [False] * 4]
    return [
        (MaskedValueMSE(), "expression", PRED, _value_batch(nomask)),
        (MVC(), "mvc", PRED, _value_batch(nomask)),
        (ZeroProbNLL(), "expression_zero_probs", PROBS, _value_batch(nomask)),
        (MVCZeroProbNLL(), "mvc_zero_probs", PROBS, _value_batch(nomask)),
        (Classification(), "class_logits", [[0.1, 2.0], [1.0, -1.0]], {"labels": torch.tensor([-100, -100])}),
        (
            Classification(label_smoothing=0.1, class_weights=[1.0, 3.0]),
            "class_logits",
            [[0.1, 2.0], [1.0, -1.0]],
            {"labels": torch.tensor([-100, -100])},
        ),
        (
            MaskedTokenLM(label_smoothing=0.5),
            "token_logits",
            [[[0.1, 2.0, 0.3], [1.0, -1.0, 0.0]]],
            {"mlm_labels": torch.full((1, 2), -100)},
        ),
    ]


@pytest.mark.parametrize("case", range(7))
def test_nothing_masked_gives_exact_zero_with_grad_path(case):
    obj, field, values, batch = _empty_cases()[case]
    x = _leaf(values)
    loss = obj(_out(**{field: x}), batch)
    assert loss.dim() == 0
    assert not torch.isnan(loss)
    assert loss.item() == 0.0
    assert loss.requires_grad
    assert loss.grad_fn is not None
    loss.backward()
    assert x.grad is not None
    assert torch.all(x.grad == 0)


# ---------------------------------------------------------------------------------------------
# Classification (cls)

LOGITS = [[0.2, -1.0, 1.5, 0.3], [2.0, 0.1, -0.4, 0.0], [-0.7, 0.9, 0.05, 1.2]]
LABELS = [2, -100, 0]


@pytest.mark.parametrize(
    ("smoothing", "weights"),
    [(0.0, None), (0.2, None), (0.0, [1.0, 2.0, 0.5, 3.0]), (0.2, [1.0, 2.0, 0.5, 3.0])],
)
def test_classification_value_and_grad(smoothing, weights):
    z = _leaf(LOGITS)
    obj = Classification(label_smoothing=smoothing, class_weights=weights)
    loss = obj(_out(class_logits=z), {"labels": torch.tensor(LABELS)})
    expected, grad = _hand_ce(LOGITS, LABELS, smoothing=smoothing, weights=weights)
    _close(loss, expected)
    loss.backward()
    _close(z.grad, grad)
    # the ignored row gets no gradient; the true-class logit is pushed up (with class weights AND
    # smoothing, torch weights the smoothing term by every class's weight, so row 0, whose label has
    # weight 0.5, is pulled towards the heavy classes instead; the hand gradient above covers it)
    assert torch.all(z.grad[1] == 0)
    assert z.grad[2, 0] < 0
    if weights is None or smoothing == 0.0:
        assert z.grad[0, 2] < 0
    else:
        assert z.grad[0, 2] > 0


def test_classification_plain_value_spelled_out():
    # two rows kept (row 1 ignored): mean of -log softmax(z)[y]
    lp0, lp2 = _log_softmax(LOGITS[0]), _log_softmax(LOGITS[2])
    expected = (-lp0[2] - lp2[0]) / 2
    loss = Classification()(
        _out(class_logits=torch.tensor(LOGITS, dtype=D)), {"labels": torch.tensor(LABELS)}
    )
    _close(loss, expected)
    # class weights: Σ w_y (-log p_y) / Σ w_y with w = [1, 2, 0.5, 3] -> (0.5·(-lp0[2]) + 1·(-lp2[0])) / 1.5
    w = [1.0, 2.0, 0.5, 3.0]
    loss_w = Classification(class_weights=w)(
        _out(class_logits=torch.tensor(LOGITS, dtype=D)), {"labels": torch.tensor(LABELS)}
    )
    _close(loss_w, (0.5 * -lp0[2] + 1.0 * -lp2[0]) / 1.5)
    # label smoothing e over C classes: (1-e)(-log p_y) + e/C Σ_c -log p_c
    e = 0.2
    per = [(1 - e) * -lp[y] + e / 4 * sum(-v for v in lp) for lp, y in ((lp0, 2), (lp2, 0))]
    loss_s = Classification(label_smoothing=e)(
        _out(class_logits=torch.tensor(LOGITS, dtype=D)), {"labels": torch.tensor(LABELS)}
    )
    _close(loss_s, sum(per) / 2)


def test_classification_ignored_label_does_not_change_value():
    z = torch.tensor(LOGITS, dtype=D)
    full = Classification()(_out(class_logits=z), {"labels": torch.tensor(LABELS)})
    other = Classification()(_out(class_logits=z[[0, 2]]), {"labels": torch.tensor([2, 0])})
    _close(full, other.item())


def test_classification_gradient_step_lowers_loss():
    obj = Classification(label_smoothing=0.1, class_weights=[1.0, 2.0, 0.5, 3.0])
    z = _leaf(LOGITS)
    batch = {"labels": torch.tensor(LABELS)}
    before = obj(_out(class_logits=z), batch)
    before.backward()
    stepped = [[v - 0.5 * g for v, g in zip(r, gr)] for r, gr in zip(LOGITS, z.grad.tolist())]
    after, _ = _hand_ce(stepped, LABELS, smoothing=0.1, weights=[1.0, 2.0, 0.5, 3.0])
    assert after < before.item()


# ---------------------------------------------------------------------------------------------
# DAB (adversarial batch classifier; the gradient reversal lives in the head)


def test_dab_value_and_grad():
    logits = [[0.3, -0.2], [1.1, 0.4], [-0.5, 0.8]]
    labels = [0, 1, 1]
    z = _leaf(logits)
    loss = DAB()(_out(batch_logits=z), {"batch_labels": torch.tensor(labels)})
    expected = sum(-_log_softmax(r)[y] for r, y in zip(logits, labels)) / 3
    _close(loss, expected)
    loss.backward()
    grad = [[(p - (k == y)) / 3 for k, p in enumerate(_softmax(r))] for r, y in zip(logits, labels)]
    _close(z.grad, grad)
    assert z.grad[1, 1] < 0
    assert z.grad[1, 0] > 0


# ---------------------------------------------------------------------------------------------
# Token-level masked LM (mlm)

TOK_LOGITS = [
    [[0.5, -0.3, 1.2, 0.0], [0.1, 0.2, 0.3, 0.4], [2.0, -1.0, 0.0, 0.5]],
    [[-0.2, 0.7, 0.1, -1.5], [1.0, 1.0, -1.0, 0.3], [0.0, 0.0, 0.9, -0.6]],
]
TOK_LABELS = [[2, -100, 0], [-100, 3, 1]]


@pytest.mark.parametrize("smoothing", [0.0, 0.5])
def test_masked_token_lm_value_and_grad(smoothing):
    z = _leaf(TOK_LOGITS)
    loss = MaskedTokenLM(label_smoothing=smoothing)(
        _out(token_logits=z), {"mlm_labels": torch.tensor(TOK_LABELS)}
    )
    flat = [tok for cell in TOK_LOGITS for tok in cell]
    flat_y = [y for cell in TOK_LABELS for y in cell]
    expected, grad = _hand_ce(flat, flat_y, smoothing=smoothing)
    # spelled out for 4 kept tokens without smoothing
    if smoothing == 0.0:
        kept = [(0, 0, 2), (0, 2, 0), (1, 1, 3), (1, 2, 1)]
        assert expected == pytest.approx(sum(-_log_softmax(TOK_LOGITS[b][t])[y] for b, t, y in kept) / 4)
    _close(loss, expected)
    loss.backward()
    _close(z.grad, [grad[0:3], grad[3:6]])
    assert torch.all(z.grad[0, 1] == 0)
    assert torch.all(z.grad[1, 0] == 0)
    assert z.grad[1, 1, 3] < 0


# ---------------------------------------------------------------------------------------------
# ECS: mean over all B×B entries of 1 − (relu(S with zero diagonal) − threshold)²

# cell 0 and 1 are close (cos ≈ 0.98), 0 and 2 moderately similar, 1 and 2 have negative cos
EMB = [[1.0, 0.2, 0.0], [0.9, 0.0, 0.1], [-0.3, 1.0, 0.4]]


def _hand_ecs(emb, thr):
    b = len(emb)
    c = [_unit(v) for v in emb]
    total = 0.0
    for i in range(b):
        for j in range(b):
            s = 0.0 if i == j else max(_dot(c[i], c[j]), 0.0)
            total += 1.0 - (s - thr) ** 2
    return total / (b * b)


def _hand_ecs_grad(emb, thr):
    """d/dx_i: Σ_{j≠i, S_ij>0} 2 · dL/dS_ij · dS_ij/dx_i, with dL/dS = −2(S − thr)/B² and
    dS_ij/dx_i = (ĉ_j − S_ij ĉ_i) / |x_i| (S is symmetric, so every pair counts twice)."""
    b = len(emb)
    c = [_unit(v) for v in emb]
    grad = _zeros_like(emb)
    for i in range(b):
        for j in range(b):
            if i == j:
                continue
            s = _dot(c[i], c[j])
            if s <= 0:
                continue
            dl_ds = -2.0 * (s - thr) / (b * b)
            for k in range(len(emb[i])):
                grad[i][k] += 2.0 * dl_ds * (c[j][k] - s * c[i][k]) / _norm(emb[i])
    return grad


@pytest.mark.parametrize("thr", [0.8, 0.3, 0.0, -0.5])
def test_ecs_value_and_grad(thr):
    x = _leaf(EMB)
    loss = ECS(threshold=thr)(_out(cell_embedding=x), {})
    _close(loss, _hand_ecs(EMB, thr))
    loss.backward()
    _close(x.grad, _hand_ecs_grad(EMB, thr))
    stepped = [[v - 0.05 * g for v, g in zip(r, gr)] for r, gr in zip(EMB, x.grad.tolist())]
    assert _hand_ecs(stepped, thr) < loss.item()


def test_ecs_counts_the_zeroed_diagonal_and_clipped_negatives():
    # B=2, identical cells: S = [[0 (diag), 1], [1, 0 (diag)]]
    thr = 0.8
    loss = ECS(threshold=thr)(_out(cell_embedding=torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=D)), {})
    _close(loss, (2 * (1 - thr**2) + 2 * (1 - (1 - thr) ** 2)) / 4)
    # B=2, opposite cells: cos = -1 clipped to 0, so every one of the 4 entries is 1 - thr²
    loss = ECS(threshold=thr)(_out(cell_embedding=torch.tensor([[1.0, 0.0], [-3.0, 0.0]], dtype=D)), {})
    _close(loss, 1 - thr**2)
    # scale invariance (embeddings are L2-normalised)
    x = torch.tensor(EMB, dtype=D)
    _close(ECS()(_out(cell_embedding=7.5 * x), {}), _hand_ecs(EMB, 0.8))


def test_ecs_gradient_pushes_similarity_away_from_threshold():
    # pair above the threshold -> descent pulls them together; below -> pushes them apart
    for emb, thr, closer in (([[1.0, 0.1], [1.0, 0.3]], 0.8, True), ([[1.0, 0.0], [0.6, 1.0]], 0.8, False)):
        x = _leaf(emb)
        ECS(threshold=thr)(_out(cell_embedding=x), {}).backward()
        y = [[v - 0.01 * g for v, g in zip(r, gr)] for r, gr in zip(emb, x.grad.tolist())]
        s_before = _dot(_unit(emb[0]), _unit(emb[1]))
        s_after = _dot(_unit(y[0]), _unit(y[1]))
        assert (s_after > s_before) == closer


def test_ecs_defaults_and_threshold_check():
    assert ECS().threshold == 0.8
    assert ECS().weight == 10.0
    with pytest.raises(cellkit.ConfigError, match="threshold"):
        ECS(threshold=1.5)


# ---------------------------------------------------------------------------------------------
# CCE: cross-entropy of cos(c1_i, c2_j) / temperature against the diagonal

C1 = [[1.0, 0.5, -0.2], [0.1, 1.0, 0.3], [-0.4, 0.2, 1.0]]
C2 = [[0.8, 0.7, 0.0], [0.3, 0.9, -0.1], [0.2, -0.5, 0.9]]


def _hand_cce(c1, c2, temp):
    a, b = [_unit(v) for v in c1], [_unit(v) for v in c2]
    n = len(a)
    loss = 0.0
    for i in range(n):
        row = [_dot(a[i], b[j]) / temp for j in range(n)]
        loss += -_log_softmax(row)[i]
    return loss / n


def _hand_cce_grad_c1(c1, c2, temp):
    """dL/da_i = Σ_j (softmax_ij − δ_ij) / (n·T) · (b̂_j − cos_ij â_i) / |a_i|."""
    a, b = [_unit(v) for v in c1], [_unit(v) for v in c2]
    n = len(a)
    grad = _zeros_like(c1)
    for i in range(n):
        cos = [_dot(a[i], b[j]) for j in range(n)]
        p = _softmax([c / temp for c in cos])
        for j in range(n):
            coef = (p[j] - (i == j)) / (n * temp)
            for k in range(len(c1[i])):
                grad[i][k] += coef * (b[j][k] - cos[j] * a[i][k]) / _norm(c1[i])
    return grad


@pytest.mark.parametrize("temp", [0.5, 0.1])
def test_cce_value_and_grad(temp):
    x1, x2 = _leaf(C1), _leaf(C2)
    obj = CCE() if temp == 0.5 else CCE(temperature=temp)
    loss = obj(_out(cell_embedding=x1), {}, _out(cell_embedding=x2))
    _close(loss, _hand_cce(C1, C2, temp))
    loss.backward()
    _close(x1.grad, _hand_cce_grad_c1(C1, C2, temp))
    # the loss is symmetric in the roles of c1 / c2 after transposing, so c2 gets a gradient too
    assert x2.grad is not None
    assert torch.all(torch.isfinite(x2.grad))
    lr = 0.05
    s1 = [[v - lr * g for v, g in zip(r, gr)] for r, gr in zip(C1, x1.grad.tolist())]
    s2 = [[v - lr * g for v, g in zip(r, gr)] for r, gr in zip(C2, x2.grad.tolist())]
    assert _hand_cce(s1, s2, temp) < loss.item()


def test_cce_default_temperature_is_scgpts_half():
    assert CCE().temperature == 0.5
    assert CCE().weight == 10.0
    assert CCE.second_pass
    loss = CCE()(
        _out(cell_embedding=torch.tensor(C1, dtype=D)), {}, _out(cell_embedding=torch.tensor(C2, dtype=D))
    )
    # spelled out: row i of cos/0.5, CE against column i
    a, b = [_unit(v) for v in C1], [_unit(v) for v in C2]
    rows = [[2.0 * _dot(a[i], b[j]) for j in range(3)] for i in range(3)]
    expected = sum(math.log(sum(math.exp(v) for v in rows[i])) - rows[i][i] for i in range(3)) / 3
    _close(loss, expected)


def test_cce_needs_a_second_pass_and_positive_temperature():
    with pytest.raises(cellkit.ConfigError, match="second forward pass"):
        CCE()(_out(cell_embedding=torch.tensor(C1)), {})
    with pytest.raises(cellkit.ConfigError, match="temperature"):
        CCE(temperature=0.0)


# ---------------------------------------------------------------------------------------------
# batch keys and output fields


def _full_out():
    return _out(
        class_logits=torch.tensor(LOGITS, dtype=D),
        expression=torch.tensor(PRED, dtype=D),
        expression_zero_probs=torch.tensor(PROBS, dtype=D),
        mvc=torch.tensor(PRED, dtype=D),
        mvc_zero_probs=torch.tensor(PROBS, dtype=D),
        cell_embedding=torch.tensor(EMB, dtype=D),
        batch_logits=torch.tensor([[0.3, -0.2], [1.1, 0.4], [-0.5, 0.8]], dtype=D),
        token_logits=torch.tensor(TOK_LOGITS, dtype=D),
    )


def _full_batch():
    return {
        "labels": torch.tensor(LABELS),
        "target_values": torch.tensor(TARGET, dtype=D),
        "mlm_mask": torch.tensor(MASK),
        "batch_labels": torch.tensor([0, 1, 1]),
        "mlm_labels": torch.tensor(TOK_LABELS),
    }


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_batch_keys_are_exactly_what_the_objective_reads(name):
    obj = OBJECTIVES[name]()
    full = _full_batch()
    only = {k: full[k] for k in obj.batch_keys}
    out = _full_out()
    out2 = _full_out() if obj.second_pass else None
    loss = obj(out, only, out2)
    assert loss.dim() == 0
    assert torch.isfinite(loss)
    for key in obj.batch_keys:
        for batch in ({k: v for k, v in only.items() if k != key}, {**only, key: None}):
            with pytest.raises(cellkit.DataError, match=repr(key)):
                obj(out, batch, out2)


@pytest.mark.parametrize(
    ("obj", "hint"),
    [
        (Classification(), "label_key"),
        (DAB(), "batch_key"),
        (MaskedValueMSE(), "masking='values'"),
        (ZeroProbNLL(), "masking='values'"),
        (MVC(), "masking='values'"),
        (MVCZeroProbNLL(), "masking='values'"),
        (MaskedTokenLM(), "masking='tokens'"),
    ],
)
def test_missing_batch_key_message_says_how_to_fix_it(obj, hint):
    with pytest.raises(cellkit.DataError) as err:
        obj(_full_out(), {})
    assert hint in str(err.value)
    assert isinstance(err.value, cellkit.CellkitError)


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        (Classification(), "class_logits"),
        (MaskedValueMSE(), "expression"),
        (MVC(), "mvc"),
        (DAB(), "batch_logits"),
        (MaskedTokenLM(), "token_logits"),
        (ECS(), "cell_embedding"),
    ],
)
def test_missing_output_field_is_a_config_error(obj, field):
    out = _full_out()
    setattr(out, field, None)
    with pytest.raises(cellkit.ConfigError, match=field):
        obj(out, _full_batch())


# ---------------------------------------------------------------------------------------------
# make_objectives


def test_make_objectives_names_and_defaults():
    objs = make_objectives(["cls", "gep", "zero_nll", "mvc", "mvc_zero_nll", "ecs", "cce", "dab", "mlm"])
    assert [type(o) for o in objs] == [
        Classification,
        MaskedValueMSE,
        ZeroProbNLL,
        MVC,
        MVCZeroProbNLL,
        ECS,
        CCE,
        DAB,
        MaskedTokenLM,
    ]
    assert {o.name: o.weight for o in objs} == {
        "cls": 1.0,
        "gep": 1.0,
        "zero_nll": 1.0,
        "mvc": 1.0,
        "mvc_zero_nll": 1.0,
        "ecs": 10.0,
        "cce": 10.0,
        "dab": 1.0,
        "mlm": 1.0,
    }
    assert set(OBJECTIVES) == {o.name for o in objs}
    assert [o.name for o in make_objectives("gep")] == ["gep"]


def test_make_objectives_weights_options_and_instances():
    objs = make_objectives({"gep": 2, "mvc": 0.5, "ecs": {"threshold": 0.6, "weight": 3}})
    assert [(o.name, o.weight) for o in objs] == [("gep", 2.0), ("mvc", 0.5), ("ecs", 3)]
    assert isinstance(objs[0].weight, float)
    assert objs[2].threshold == 0.6
    cls = make_objectives({"cls": {"label_smoothing": 0.1, "class_weights": [1.0, 2.0]}})[0]
    assert cls.label_smoothing == 0.1
    assert list(cls.class_weights) == [1.0, 2.0]
    assert cls.weight == 1.0
    assert make_objectives({"mlm": {"label_smoothing": 0.5}})[0].label_smoothing == 0.5
    assert make_objectives({"cce": {"temperature": 0.2}})[0].temperature == 0.2
    mine = Classification(weight=4.0)
    assert make_objectives(mine) == [mine]
    assert make_objectives(mine)[0] is mine
    mixed = make_objectives([mine, "gep"])
    assert mixed[0] is mine
    assert mixed[1].name == "gep"
    assert make_objectives({"dab": 0})[0].weight == 0.0


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (["cls", "nope"], "Unknown objective 'nope'"),
        ({"MSE": 1.0}, "available"),
        (["cls", "cls"], "more than once"),
        ([Classification(), "cls"], "more than once"),
        ({"gep": -1.0}, "weight"),
        ({"ecs": {"weight": -2}}, "weight"),
        ({"cls": {"label_smoothin": 0.1}}, "Bad options"),
        ({"cls": "heavy"}, "weight or a dict"),
        ({"ecs": {"threshold": 2.0}}, "threshold"),
        ([], "No objective"),
        ({}, "No objective"),
    ],
)
def test_make_objectives_errors(spec, match):
    with pytest.raises(cellkit.ConfigError, match=match):
        make_objectives(spec)


def test_objective_weight_validation_and_error_types():
    with pytest.raises(cellkit.ConfigError):
        MaskedValueMSE(weight=-0.1)
    with pytest.raises(cellkit.ConfigError):
        DAB(weight="1")
    assert issubclass(cellkit.ConfigError, ValueError)
    assert all(issubclass(c, Objective) and c.name for c in OBJECTIVES.values())
