"""losses.py (and forward.py's log-prob helpers) against hand computations (docs/algorithm.md s.4)."""

import math

import numpy as np
import pytest
import torch

from rllib_treerpo.core.losses import kl_penalty, loss_weights, truncated_is_weights
from rllib_treerpo.core.losses import policy_loss as weighted_policy_loss
from rllib_treerpo.learner.forward import token_entropy, token_logprobs


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def weights(mask: torch.Tensor, loss_agg: str = "token_mean") -> torch.Tensor:
    """(B, T) loss weights of a 0/1 mask, each row one sequence: losses.loss_weights, laid out like the
    mask."""
    mask = mask.reshape(-1, mask.shape[-1]) > 0
    groups = [np.full(int(row.sum()), r) for r, row in enumerate(mask)]
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for r, w in enumerate(loss_weights(groups, loss_agg)):
        out[r, mask[r]] = torch.as_tensor(w, dtype=torch.float64)
    return out


def policy_loss(logp, old, adv, mask, loss_agg="token_mean", eps_low=0.2, eps_high=0.2, **kwargs):
    """losses.policy_loss with the mask's weights for ``loss_agg`` (and the config's default clipping)."""
    w = weights(mask, loss_agg).reshape(logp.shape)
    return weighted_policy_loss(logp, old, adv, w, eps_low=eps_low, eps_high=eps_high, **kwargs)


def test_clipping_both_sides():
    # ratios 1.5, 1.5, 0.5, 0.5 with A = +1, -1, +1, -1; eps 0.2
    logp = t([math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)])
    old = torch.zeros_like(logp)
    adv = t([1.0, -1.0, 1.0, -1.0])
    mask = torch.ones_like(logp)
    loss, stats = policy_loss(logp, old, adv, mask)
    # per token: -min(1.5, 1.2) = -1.2 | -min(-1.5, -1.2) = 1.5 | -min(.5, .8) = -.5 | -min(-.5, -.8) = .8
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4)
    assert stats["clip_frac"].item() == pytest.approx(0.5)  # tokens 1 and 4 took the clipped term
    assert stats["ratio_mean"].item() == pytest.approx(1.0)


def test_asymmetric_clip():
    logp = t([math.log(1.5)])
    loss, _ = policy_loss(
        logp, torch.zeros_like(logp), t([1.0]), torch.ones_like(logp), eps_low=0.2, eps_high=0.28
    )
    assert loss.item() == pytest.approx(-1.28)
    logp = t([math.log(0.5)])
    loss, _ = policy_loss(
        logp, torch.zeros_like(logp), t([-1.0]), torch.ones_like(logp), eps_low=0.1, eps_high=0.28
    )
    assert loss.item() == pytest.approx(0.9)


def test_gradient_zero_where_clipped():
    logp = t([math.log(1.5), math.log(1.1)]).requires_grad_()
    loss, _ = policy_loss(logp, torch.zeros(1, 2, dtype=torch.float64), t([1.0, 1.0]), torch.ones(1, 2))
    loss.backward()
    # d/dlogp of -(ratio * A)/2 = -ratio/2 for the unclipped token; 0 for the clipped one
    assert logp.grad[0, 0].item() == 0.0
    assert logp.grad[0, 1].item() == pytest.approx(-1.1 / 2)


def test_mask_and_aggregations():
    # row 0: two tokens with per-token loss -1 and -3 (ratio 1, A 1 and 3); row 1: one token, loss -5
    logp = torch.zeros(2, 3, dtype=torch.float64)
    adv = t([1.0, 3.0, 100.0], [5.0, 100.0, 100.0])
    mask = t([1, 1, 0], [1, 0, 0])
    tok, _ = policy_loss(logp, logp, adv, mask, loss_agg="token_mean")
    seq, _ = policy_loss(logp, logp, adv, mask, loss_agg="seq_mean_token_mean")
    assert tok.item() == pytest.approx(-(1 + 3 + 5) / 3)
    assert seq.item() == pytest.approx(-((1 + 3) / 2 + 5) / 2)


def test_loss_weights_ignore_empty_rows_and_handle_an_empty_batch():
    v = t([2.0, 4.0], [7.0, 7.0])
    assert (v * weights(t([1, 1], [0, 0]), "seq_mean_token_mean")).sum().item() == pytest.approx(3.0)
    assert (v * weights(torch.zeros(2, 2, dtype=torch.float64), "token_mean")).sum().item() == 0.0
    with pytest.raises(ValueError, match="loss_agg"):
        weights(v, "sum")


@pytest.mark.parametrize(
    "estimator, expected",
    [
        # logp = log .5, ref = log .25: log(ref/p) = log .5
        ("k1", -math.log(0.5)),
        ("k2", 0.5 * math.log(0.5) ** 2),
        ("k3", 0.5 - math.log(0.5) - 1),
    ],
)
def test_kl_estimators(estimator, expected):
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    assert kl_penalty(logp, ref, estimator).item() == pytest.approx(expected)
    loss, stats = policy_loss(
        logp, logp, t([0.0]), torch.ones(1, 1), ref_logprobs=ref, kl_coef=0.1, kl_estimator=estimator
    )
    assert stats["kl"].item() == pytest.approx(expected)
    assert loss.item() == pytest.approx(0.1 * expected)


def test_kl_needs_reference_and_known_estimator():
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(x, x, x, x + 1, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(x, x, "k4")


def test_kl_off_ignores_reference():
    x = torch.zeros(1, 1)
    loss, stats = policy_loss(x, x, x, x + 1, ref_logprobs=x - 5, kl_coef=0.0)
    assert stats["kl"].item() == 0.0 and loss.item() == 0.0


def test_approx_kl_is_zero_on_policy_and_positive_off():
    x = torch.zeros(1, 3)
    _, stats = policy_loss(x, x, x, torch.ones(1, 3))
    assert stats["approx_kl"].item() == 0.0
    _, stats = policy_loss(x + 0.3, x, x, torch.ones(1, 3))
    assert stats["approx_kl"].item() == pytest.approx(math.exp(-0.3) + 0.3 - 1)


def test_token_logprobs_alignment_and_temperature():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    for temp in (1.0, 0.7):
        out = token_logprobs(logits, ids, temp)
        assert out.shape == (2, 5) and torch.all(out[:, 0] == 0)
        ref = torch.log_softmax(logits / temp, -1)
        for b in range(2):
            for pos in range(1, 5):
                assert out[b, pos].item() == pytest.approx(ref[b, pos - 1, ids[b, pos]].item(), abs=1e-6)


def test_token_entropy_uniform():
    ent = token_entropy(torch.zeros(1, 3, 8))
    assert ent[0, 0].item() == 0.0
    assert ent[0, 1].item() == pytest.approx(math.log(8), abs=1e-6)


def test_truncated_is_weights_are_capped_ratios_without_gradient():
    learner = t([math.log(0.5), math.log(0.2), math.log(0.9)]).requires_grad_()
    sampler = t([math.log(0.25), math.log(0.4), math.log(0.1)])
    w = truncated_is_weights(learner, sampler, cap=2.0)
    assert w[0].tolist() == pytest.approx([2.0, 0.5, 2.0])  # 0.5/0.25, 0.2/0.4, 0.9/0.1 = 9 -> the cap
    assert not w.requires_grad


def test_is_weights_scale_each_tokens_policy_gradient():
    logp = t([0.0, 0.0]).requires_grad_()
    loss, _ = policy_loss(logp, logp.detach(), t([1.0, 1.0]), torch.ones(1, 2), is_weights=t([2.0, 0.5]))
    loss.backward()
    assert loss.item() == pytest.approx(-(2.0 + 0.5) / 2)  # rho = 1: -w A per token, token mean
    assert logp.grad[0].tolist() == pytest.approx([-1.0, -0.25])


def test_head_target_stats_in_chunks_equal_the_whole_logits_and_never_hold_more_than_a_chunk():
    """Chunked LM head (the learner's memory bound for large vocabularies): the same log-probs, entropies and
    gradients as log-softmax over the whole (B, M, V) logits, with no head call over more than a chunk."""
    from rllib_treerpo.learner.forward import distribution_entropy, head_target_stats, target_logprobs

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=False).double()
    hidden = torch.randn(3, 5, 6, dtype=torch.float64, generator=g)
    targets = torch.randint(0, 11, (3, 5), generator=g)
    results = {}
    for chunk in (None, 4):
        rows_seen = []
        hook = head.register_forward_hook(lambda m, i, o, seen=rows_seen: seen.append(o.shape[0]))
        h = hidden.clone().requires_grad_()
        head.zero_grad()
        # bound 0: chunked whatever the size (the size rule itself: tests/unit/test_learner_memory.py)
        logprobs, entropy = head_target_stats(head, h, targets, 0.7, chunk=chunk, bound_bytes=0)
        (logprobs * torch.arange(15.0, dtype=torch.float64).reshape(3, 5)).sum().backward()
        hook.remove()
        results[chunk] = (logprobs.detach(), entropy, h.grad, head.weight.grad.clone(), rows_seen)
    whole, chunked = results[None], results[4]
    assert max(chunked[4]) == 4 and len(chunked[4]) == 8  # 4 chunks, each computed again in the backward
    assert whole[4] == [15]
    for a, b in zip(whole[:4], chunked[:4], strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    with torch.no_grad():
        logits = head(hidden)
    torch.testing.assert_close(chunked[0], target_logprobs(logits, targets, 0.7), atol=1e-12, rtol=0)
    torch.testing.assert_close(chunked[1], distribution_entropy(logits, 0.7), atol=1e-12, rtol=0)
    assert not chunked[1].requires_grad
