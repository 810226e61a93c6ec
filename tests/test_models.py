"""DIN and BaseModel (din_fast.ctr.models) and the CTR metrics (din_fast.ctr.metrics)."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from din_fast import DIN, BaseModel
from din_fast.ctr.data import build_samples, encode, iterate_batches
from din_fast.ctr.loaders import synthetic_interactions
from din_fast.ctr.metrics import ctr_metrics, gauc, logloss_of_logits


def test_gauc_hand_computed():
    # user 1: positive 0.9 beats 0.3, loses to 0.95          -> AUC 1/2, 3 samples
    # user 2: (0.8, 0.4) vs (0.4, 0.1): 3 wins and 1 tie of 4 -> AUC 7/8, 4 samples
    # users 3 and 4 have one class only and are skipped
    users = [2, 1, 3, 1, 2, 4, 2, 1, 2, 4]
    labels = [1, 1, 1, 0, 0, 0, 1, 0, 0, 0]
    scores = [0.8, 0.9, 0.5, 0.3, 0.4, 0.2, 0.4, 0.95, 0.1, 0.7]
    assert gauc(users, labels, scores) == pytest.approx((3 * 0.5 + 4 * 7 / 8) / 7, abs=1e-12)


def test_gauc_matches_per_user_sklearn():
    rng = np.random.default_rng(0)
    users = rng.integers(0, 40, 600)
    labels = rng.integers(0, 2, 600)
    scores = np.round(rng.normal(size=600) + labels, 1)          # rounding makes ties
    total = weight = 0.0
    for u in np.unique(users):
        rows = users == u
        if len(np.unique(labels[rows])) == 2:
            total += rows.sum() * roc_auc_score(labels[rows], scores[rows])
            weight += rows.sum()
    assert gauc(users, labels, scores) == pytest.approx(total / weight, abs=1e-12)


def test_gauc_rejects_bad_input():
    with pytest.raises(ValueError, match="one length"):
        gauc([1, 2], [0, 1], [0.5])
    with pytest.raises(ValueError, match="no samples"):
        gauc([], [], [])
    with pytest.raises(ValueError, match="one class"):
        gauc([1, 1, 2], [1, 1, 0], [0.1, 0.2, 0.3])


def test_ctr_metrics_of_logits():
    metrics = ctr_metrics([1, 1, 2, 2], [1, 0, 0, 1], [2.0, -1.0, 0.5, 0.0])
    assert metrics["auc"] == pytest.approx(0.75)
    assert metrics["gauc"] == pytest.approx(0.5)
    p = 1 / (1 + np.exp(-np.array([2.0, -1.0, 0.5, 0.0])))
    expected = -np.mean(np.log([p[0], 1 - p[1], 1 - p[2], p[3]]))
    assert metrics["logloss"] == pytest.approx(expected)


def small_batch(batch_size=24, seed=0):
    data = encode(synthetic_interactions(num_users=40, seed=seed))
    train = build_samples(data, seed=seed).test
    _, batch = next(iterate_batches(data, train, batch_size, shuffle=True,
                                    rng=np.random.default_rng(seed)))
    return data, batch


@pytest.mark.parametrize("model_class", [DIN, BaseModel])
def test_padding_beyond_lengths_changes_nothing(model_class):
    data, batch = small_batch()
    torch.manual_seed(0)
    model = model_class(data.num_items, data.num_categories, embed_dim=4).eval()
    padded = [torch.cat([batch.history_items, torch.zeros_like(batch.history_items)], 1),
              torch.cat([batch.history_categories, torch.zeros_like(batch.history_items)], 1)]
    logits = model(*batch[:5])
    assert logits.shape == (len(batch.labels),)
    assert torch.allclose(model(*padded, *batch[2:5]), logits, atol=1e-6)


@pytest.mark.parametrize("model_class", [DIN, BaseModel])
def test_ids_past_lengths_change_nothing(model_class):
    """Whatever ids lie past a row's length (real items, not the padding id)
    never reach the score or a gradient."""
    data, batch = small_batch()
    torch.manual_seed(0)
    model = model_class(data.num_items, data.num_categories, embed_dim=4).eval()
    items, categories, lengths = batch.history_items, batch.history_categories, batch.lengths
    past = torch.arange(items.shape[1]) >= lengths[:, None]
    noisy = [torch.where(past, torch.randint(1, high + 1, items.shape), ids)
             for ids, high in ((items, data.num_items), (categories, data.num_categories))]
    assert (noisy[0] != items).any()
    logits = model(*batch[:5])
    torch.testing.assert_close(model(*noisy, *batch[2:5]), logits, rtol=0, atol=1e-6)
    model(*noisy, *batch[2:5]).sum().backward()
    used = set(items[~past].tolist()) | set(batch.target_items.tolist()) | {0}
    unused = [i for i in set(noisy[0][past].tolist()) if i not in used]
    assert not model.item_embedding.weight.grad[unused].any()


@pytest.mark.parametrize("model_class", [DIN, BaseModel])
@pytest.mark.parametrize("argument,bad,error,message", [
    ("lengths", lambda b: b.lengths.clone().fill_(99), ValueError,
     r"`lengths` must lie in \[0, T\], T the width of `history_items`; got lengths\[0\] = 99 "
     r"with T = \d+"),
    ("lengths", lambda b: b.lengths.float(), TypeError, r"`lengths` must be an int32 or int64"),
    ("lengths", lambda b: b.lengths[:-1], ValueError, r"`lengths` must be \[B\] with B = 24"),
    ("history_items", lambda b: b.history_items + 10_000, ValueError,
     r"`history_items` must lie in \[0, \d+\], the item table's ids; got history_items\[0, 0\]"),
    ("target_categories", lambda b: -b.target_categories, ValueError,
     r"`target_categories` must lie in \[0, \d+\], the category table's ids"),
    ("target_items", lambda b: b.target_items[:3], ValueError,
     r"`target_items` and `target_categories` must both be \[B\]")],
    ids=["lengths above T", "lengths float", "lengths short", "item id beyond the table",
         "category id negative", "targets short"])
def test_bad_batches_are_named(model_class, argument, bad, error, message):
    data, batch = small_batch()
    model = model_class(data.num_items, data.num_categories, embed_dim=4).eval()
    inputs = dict(zip(("history_items", "history_categories", "lengths", "target_items",
                       "target_categories"), batch[:5]))
    inputs[argument] = bad(batch)
    with pytest.raises(error, match=rf"^{model_class.__name__}: {message}"):
        model(**inputs)


def test_base_model_sum_pools_the_history():
    data, batch = small_batch()
    model = BaseModel(data.num_items, data.num_categories, embed_dim=4)
    assert (model.item_embedding.weight[0] == 0).all()
    history = model.embed(batch.history_items, batch.history_categories)
    row, length = 3, int(batch.lengths[3])
    candidate = model.embed(batch.target_items, batch.target_categories)
    pooled = model.pool(candidate, history, batch.lengths)
    assert torch.allclose(pooled[row], history[row, :length].sum(0))


@pytest.mark.parametrize("model_class", [DIN, BaseModel])
@pytest.mark.parametrize("mlp_activation", ["prelu", "dice"])
def test_many_candidates_score_as_one_at_a_time(model_class, mlp_activation):
    # [B, C] candidates: each history pooled once (a 3-D attention query), the
    # same logits as C separate calls.
    data, batch = small_batch()
    torch.manual_seed(3)
    model = model_class(data.num_items, data.num_categories, embed_dim=4,
                        mlp_activation=mlp_activation).eval()
    candidates = torch.randint(1, data.num_items + 1, (len(batch.labels), 5))
    categories = torch.from_numpy(data.item_category)[candidates]
    many = model(*batch[:3], candidates, categories)
    one = torch.stack([model(*batch[:3], candidates[:, c], categories[:, c]) for c in range(5)], 1)
    assert many.shape == (len(batch.labels), 5)
    assert torch.allclose(many, one, atol=1e-6)


def one_step(model, batch):
    model.zero_grad()
    loss = F.binary_cross_entropy_with_logits(model(*batch[:5]), batch.labels.to(next(model.parameters()).dtype))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attention_activation, normalization, mlp_activation", [
    ("sigmoid", "softmax", "prelu"), ("sigmoid", None, "dice"), ("prelu", None, "prelu")])
def test_training_step_same_on_torch_and_reference_backends(attention_activation,
                                                            normalization, mlp_activation):
    data, batch = small_batch()
    torch.manual_seed(1)
    reference = DIN(data.num_items, data.num_categories, embed_dim=6,
                    mlp_activation=mlp_activation, attention_activation=attention_activation,
                    attention_normalization=normalization, backend="reference").double().train()
    fast = copy.deepcopy(reference)
    fast.attention.backend = "torch"
    loss_ref, grads_ref = one_step(reference, batch)
    loss_fast, grads_fast = one_step(fast, batch)
    assert torch.allclose(loss_fast, loss_ref, rtol=1e-12, atol=0)
    assert grads_ref.keys() == grads_fast.keys()
    for name, grad in grads_ref.items():
        # Softmax makes the score bias's true gradient zero: only rounding is left.
        assert (grads_fast[name] - grad).norm() <= 1e-10 * grad.norm() + 1e-14, name


def test_training_step_triton_matches_reference_when_available():
    # Triton runs float32 (on CPU in the interpreter); the oracle runs float64.
    data, batch = small_batch(batch_size=6)
    torch.manual_seed(2)
    reference = DIN(data.num_items, data.num_categories, embed_dim=4, backend="reference")
    fused = copy.deepcopy(reference)
    fused.attention.backend = "triton"
    try:
        loss_fused, grads_fused = one_step(fused, batch)
    except (ValueError, RuntimeError, NotImplementedError) as error:
        pytest.skip(f"triton backend not usable here: {error}")
    loss_ref, grads_ref = one_step(reference.double(), batch)
    assert torch.allclose(loss_fused.double(), loss_ref, rtol=1e-5)
    for name, grad in grads_ref.items():
        assert (grads_fused[name].double() - grad).norm() <= 1e-4 * grad.norm() + 1e-7, name


def test_gauc_refuses_nan_scores_and_labels():
    """A NaN score ranked as a tie of its own, last: GAUC 1.0 where AUC raises."""
    with pytest.raises(ValueError, match=r"`scores` holds 1 NaN\(s\), the first at index 1"):
        gauc([1, 1, 1, 1], [0, 1, 1, 0], [0.1, float("nan"), 0.3, 0.2])
    with pytest.raises(ValueError, match="`labels` holds 1 NaN"):
        gauc([1, 1], [0, float("nan")], [0.1, 0.2])


def test_logloss_of_confident_wrong_logits_is_not_clipped():
    """The sigmoid of a logit of 60 is 1.0 in float64, which logloss clipped:
    a sample scored 60 and wrong cost 36 (36.04 reported), not 60."""
    metrics = ctr_metrics([1, 1, 2, 2], [0, 1, 0, 1], [60.0, -60.0, -50.0, 50.0])
    assert metrics["logloss"] == pytest.approx((60 + 60 + 2 * math.log1p(math.exp(-50))) / 4)
    with pytest.raises(ValueError, match="`labels` holds 2.0 at index 1; expected 0 or 1"):
        logloss_of_logits([0, 2], [0.0, 1.0])
