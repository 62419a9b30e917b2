"""Numeric tests of dpo_llama.utils.losses.

Expected values are derived by hand in each docstring; all tensors are float64. Notation: πc, πr are policy
log-probs of the chosen / rejected response, refc, refr the reference ones, h = (πc − πr) − (refc − refr),
σ the logistic function. Useful facts: σ(0) = 1/2, σ(ln 3) = 3/4, σ(−ln 3) = 1/4, d log σ(x)/dx = σ(−x).
"""

import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from dpo_llama.utils.losses import (
    LOSS_TYPES,
    KTOLogps,
    PreferenceLogps,
    hinge_loss,
    ipo_loss,
    kto_batch_loss,
    kto_kl_estimate,
    kto_loss,
    orpo_loss,
    preference_loss,
    robust_loss,
    sft_nll,
    sigmoid_loss,
    simpo_loss,
)

LN2 = math.log(2)
LN3 = math.log(3)


def t(*values: float) -> torch.Tensor:
    """A float64 leaf tensor that records gradients."""
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def losses_and_grads(loss_fn, *inputs, **kwargs):
    """Per-example losses of ``loss_fn(*inputs, **kwargs)`` and d(sum of losses)/d input for each input.

    Examples are independent, so the gradient of the sum holds each example's own gradient.
    """
    output = loss_fn(*inputs, **kwargs)
    output.losses.sum().backward()
    return output, [x.grad for x in inputs]


def pair_inputs(h: float):
    """(πc, πr, refc, refr) for one pair with margin h: πc = h − 5, πr = −5, refc = refr = −3."""
    return t(h - 5.0), t(-5.0), t(-3.0), t(-3.0)


def cfg(**overrides) -> SimpleNamespace:
    """A duck-typed loss config with neutral defaults."""
    values = dict(beta=0.5, label_smoothing=0.0, simpo_gamma=0.0, sft_weight=0.0)
    values.update(overrides)
    return SimpleNamespace(**values)


def assert_close(actual: torch.Tensor, expected) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.detach(), expected.expand_as(actual), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------- sigmoid


def test_sigmoid_at_zero_margin():
    """πc = −10, πr = −12, refc = −11, refr = −13, so h = 2 − 2 = 0; β = 0.1.

    loss = −log σ(0) = ln 2. d loss/d πc = −β·σ(−βh) = −β/2 = −0.05; d/d πr = +0.05;
    the reference enters with the opposite sign: d/d refc = +0.05, d/d refr = −0.05.
    Rewards: β(πc − refc) = 0.1, β(πr − refr) = 0.1.
    """
    output, grads = losses_and_grads(sigmoid_loss, t(-10.0), t(-12.0), t(-11.0), t(-13.0), beta=0.1)
    assert_close(output.losses, LN2)
    for grad, expected in zip(grads, (-0.05, 0.05, 0.05, -0.05)):
        assert_close(grad, expected)
    assert_close(output.chosen_rewards, 0.1)
    assert_close(output.rejected_rewards, 0.1)
    assert not output.chosen_rewards.requires_grad and not output.rejected_rewards.requires_grad


def test_sigmoid_at_beta_h_ln3():
    """β = 0.5, h = 2 ln 3, so βh = ln 3 and σ(βh) = 3/4.

    loss = −ln(3/4) = ln(4/3); d loss/d πc = −β·σ(−βh) = −0.5·1/4 = −0.125; d/d πr = +0.125.
    """
    output, grads = losses_and_grads(sigmoid_loss, *pair_inputs(2 * LN3), beta=0.5)
    assert_close(output.losses, math.log(4 / 3))
    assert_close(grads[0], -0.125)
    assert_close(grads[1], 0.125)


def test_cdpo_value_and_stationary_point():
    """cDPO with ε = 1/4, β = 0.5, βh = ln 3.

    loss = −(3/4)·ln(3/4) − (1/4)·ln(1/4) = (3/4)·ln(4/3) + (1/4)·ln 4.
    d loss/d πc = −β·((1 − ε)·σ(−βh) − ε·σ(βh)) = −β·(3/4·1/4 − 1/4·3/4) = 0: cDPO stops pushing once
    σ(βh) = 1 − ε, i.e. at βh = ln((1 − ε)/ε) = ln 3.
    """
    output, grads = losses_and_grads(sigmoid_loss, *pair_inputs(2 * LN3), beta=0.5, label_smoothing=0.25)
    assert_close(output.losses, 0.75 * math.log(4 / 3) + 0.25 * math.log(4))
    assert_close(grads[0], 0.0)
    assert_close(grads[1], 0.0)


def test_sigmoid_small_beta_limit():
    """β → 0 at fixed h = 5: loss = −log σ(βh) = ln 2 − βh/2 + O(β²) → ln 2, and
    d loss/d πc = −β·σ(−βh) = −β/2 + O(β²): the gradient vanishes like β, with grad/β → −1/2.
    With β = 1e-8 the O(β) terms are below 1e-7.
    """
    beta = 1e-8
    output, grads = losses_and_grads(sigmoid_loss, *pair_inputs(5.0), beta=beta)
    torch.testing.assert_close(output.losses.detach(), torch.tensor([LN2], dtype=torch.float64), atol=1e-7, rtol=0)
    torch.testing.assert_close(grads[0] / beta, torch.tensor([-0.5], dtype=torch.float64), atol=1e-7, rtol=0)


# ------------------------------------------------------------------------------------------------ robust


def test_robust_value_and_gradient():
    """rDPO with ε = 1/4 (1 − 2ε = 1/2), β = 0.5, βh = ln 3.

    loss = (−(3/4)·ln(3/4) + (1/4)·ln(1/4)) / (1/2) = 1.5·ln(4/3) − 0.5·ln 4 ≈ −0.2616 (it may be negative).
    d loss/d πc = −β·((1 − ε)·σ(−βh) + ε·σ(βh)) / (1 − 2ε) = −0.5·(3/16 + 3/16)/(1/2) = −0.375; d/d πr = +0.375.
    """
    output, grads = losses_and_grads(robust_loss, *pair_inputs(2 * LN3), beta=0.5, label_smoothing=0.25)
    assert_close(output.losses, 1.5 * math.log(4 / 3) - 0.5 * math.log(4))
    assert_close(grads[0], -0.375)
    assert_close(grads[1], 0.375)


@pytest.mark.parametrize("h", [-3.0, 0.0, 0.7, 4.0])
def test_zero_label_smoothing_is_dpo(h):
    """With ε = 0 both cDPO and rDPO reduce to −log σ(βh), in value and in gradient."""
    dpo, dpo_grads = losses_and_grads(sigmoid_loss, *pair_inputs(h), beta=0.3)
    for loss_fn in (sigmoid_loss, robust_loss):
        output, grads = losses_and_grads(loss_fn, *pair_inputs(h), beta=0.3, label_smoothing=0.0)
        assert_close(output.losses, dpo.losses.detach())
        for grad, dpo_grad in zip(grads, dpo_grads):
            assert_close(grad, dpo_grad)


@pytest.mark.parametrize("epsilon", [0.1, 0.25, 0.4])
def test_robust_is_unbiased(epsilon):
    """If a label is flipped with probability ε (a flip turns h into −h), the expected rDPO loss is the clean
    DPO loss: (1 − ε)·L(h) + ε·L(−h), with L(h) = (−(1−ε)·log σ(βh) + ε·log σ(−βh))/(1 − 2ε), collects
    −log σ(βh)·((1 − ε)² − ε²)/(1 − 2ε) = −log σ(βh), the log σ(−βh) terms cancelling.
    """
    h = torch.tensor([-2.0, -0.5, 0.0, 1.0, 6.0], dtype=torch.float64)
    zeros = torch.zeros_like(h)
    kept = robust_loss(h, zeros, zeros, zeros, beta=0.7, label_smoothing=epsilon).losses
    flipped = robust_loss(-h, zeros, zeros, zeros, beta=0.7, label_smoothing=epsilon).losses
    clean = -torch.nn.functional.logsigmoid(0.7 * h)
    torch.testing.assert_close((1 - epsilon) * kept + epsilon * flipped, clean, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("epsilon", [-0.1, 0.5, 0.7])
def test_robust_rejects_bad_label_smoothing(epsilon):
    with pytest.raises(ValueError, match="label_smoothing"):
        robust_loss(*pair_inputs(1.0), beta=0.1, label_smoothing=epsilon)


@pytest.mark.parametrize("epsilon", [-0.1, 0.6])
def test_cdpo_rejects_bad_label_smoothing(epsilon):
    with pytest.raises(ValueError, match="label_smoothing"):
        sigmoid_loss(*pair_inputs(1.0), beta=0.1, label_smoothing=epsilon)


# --------------------------------------------------------------------------------------------------- IPO


def test_ipo_value_and_gradient():
    """β = 0.5, so the target is 1/(2β) = 1. With h = 3: loss = (3 − 1)² = 4,
    d loss/d πc = 2·(h − 1) = 4, d/d πr = −4. Rewards β(π − ref): 0.5·(−2 − (−3)) = 0.5 and 0.5·(−5 + 3) = −1.
    """
    output, grads = losses_and_grads(ipo_loss, *pair_inputs(3.0), beta=0.5)
    assert_close(output.losses, 4.0)
    assert_close(grads[0], 4.0)
    assert_close(grads[1], -4.0)
    assert_close(output.chosen_rewards, 0.5)
    assert_close(output.rejected_rewards, -1.0)


def test_ipo_minimum_at_half_inverse_beta():
    """β = 0.25, target 1/(2β) = 2: loss 0 and gradient 0 at h = 2, and over a grid of h the smallest
    loss sits at h = 2 (loss = (h − 2)²).
    """
    output, grads = losses_and_grads(ipo_loss, *pair_inputs(2.0), beta=0.25)
    assert_close(output.losses, 0.0)
    assert_close(grads[0], 0.0)
    h = torch.linspace(-2.0, 6.0, 81, dtype=torch.float64)
    zeros = torch.zeros_like(h)
    losses = ipo_loss(h, zeros, zeros, zeros, beta=0.25).losses
    assert h[losses.argmin()].item() == pytest.approx(2.0)
    torch.testing.assert_close(losses, (h - 2.0) ** 2)


def test_ipo_rejects_non_positive_beta():
    with pytest.raises(ValueError, match="beta"):
        ipo_loss(*pair_inputs(1.0), beta=0.0)


# ------------------------------------------------------------------------------------------------- hinge


def test_hinge_value_and_gradient():
    """β = 0.5. h = 0: loss = relu(1) = 1, d loss/d πc = −β = −0.5, d/d πr = +0.5.
    h = 1: loss = relu(0.5) = 0.5 with the same gradient.
    """
    output, grads = losses_and_grads(hinge_loss, t(-5.0, -4.0), t(-5.0, -5.0), t(-3.0, -3.0), t(-3.0, -3.0), beta=0.5)
    assert_close(output.losses, torch.tensor([1.0, 0.5], dtype=torch.float64))
    assert_close(grads[0], -0.5)
    assert_close(grads[1], 0.5)


@pytest.mark.parametrize("h", [2.0, 2.5, 10.0])
def test_hinge_zero_once_margin_reached(h):
    """β = 0.5: βh ≥ 1 for h ≥ 2, so relu(1 − βh) = 0 and the gradient is 0 (relu'(0) = 0 in torch)."""
    output, grads = losses_and_grads(hinge_loss, *pair_inputs(h), beta=0.5)
    assert_close(output.losses, 0.0)
    assert_close(grads[0], 0.0)
    assert_close(grads[1], 0.0)


# ------------------------------------------------------------------------------------------------- SimPO


def test_simpo_value_and_gradient():
    """β = 2, γ = 1, avg_c = −1, avg_r = −1.5: β·(avg_c − avg_r) − γ = 2·0.5 − 1 = 0.
    loss = ln 2; d loss/d avg_c = −β·σ(0) = −1, d/d avg_r = +1. Rewards β·avg: −2 and −3.
    """
    output, grads = losses_and_grads(simpo_loss, t(-1.0), t(-1.5), beta=2.0, gamma=1.0)
    assert_close(output.losses, LN2)
    assert_close(grads[0], -1.0)
    assert_close(grads[1], 1.0)
    assert_close(output.chosen_rewards, -2.0)
    assert_close(output.rejected_rewards, -3.0)


def test_simpo_ignores_reference():
    """SimPO is reference-free: changing (or dropping) the reference log-probs changes nothing."""
    counts = torch.tensor([4, 8])
    policy = dict(policy_chosen_logps=torch.tensor([-4.0, -6.0]), policy_rejected_logps=torch.tensor([-8.0, -4.0]))
    config = cfg(beta=2.0, simpo_gamma=0.5)
    outputs = [
        preference_loss("simpo", PreferenceLogps(**policy, ref_chosen_logps=refc, ref_rejected_logps=refr,
                                                 chosen_counts=counts, rejected_counts=counts), config)
        for refc, refr in [(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0])),
                           (torch.tensor([-9.0, 0.0]), torch.tensor([-0.5, -7.0])),
                           (None, None)]
    ]
    for output in outputs[1:]:
        for field, reference in zip(output, outputs[0]):
            torch.testing.assert_close(field, reference, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------------- ORPO


def test_orpo_value_and_gradient():
    """β = 0.5, avg_c = avg_r = −ln 2 (p = 1/2, odds 1): lo = 0, loss = −β·log σ(0) = β·ln 2.
    d lo/d avg_c = 1 + p/(1 − p) = 1/(1 − p) = 2, so d loss/d avg_c = −β·σ(0)·2 = −β = −0.5; d/d avg_r = +0.5.
    Rewards β·avg = −0.5·ln 2.
    """
    output, grads = losses_and_grads(orpo_loss, t(-LN2), t(-LN2), beta=0.5)
    assert_close(output.losses, 0.5 * LN2)
    assert_close(grads[0], -0.5)
    assert_close(grads[1], 0.5)
    assert_close(output.chosen_rewards, -0.5 * LN2)


def test_orpo_general_point():
    """β = 1, p_c = 3/4 (avg_c = ln(3/4), odds 3), p_r = 1/4 (avg_r = ln(1/4), odds 1/3): lo = ln 9,
    loss = ln(1 + 1/9) = ln(10/9). d loss/d avg_c = −σ(−lo)/(1 − p_c) = −(1/10)·4 = −0.4;
    d loss/d avg_r = +σ(−lo)/(1 − p_r) = (1/10)·(4/3) = 2/15.
    """
    output, grads = losses_and_grads(orpo_loss, t(math.log(0.75)), t(math.log(0.25)), beta=1.0)
    assert_close(output.losses, math.log(10 / 9))
    assert_close(grads[0], -0.4)
    assert_close(grads[1], 2 / 15)


def test_orpo_stable_as_avg_goes_to_zero():
    """avg_r = −ln 2 (odds_r = 1) and avg_c → 0⁻ (odds_c → ∞), β = 0.5.

    loss = β·log(1 + odds_r/odds_c) = β·log(1 + (1 − p_c)/p_c) = −β·avg_c, since 1 + (1 − p)/p = 1/p.
    d loss/d avg_c = −β·σ(−lo)/(1 − p_c) = −β·(1 − p_c)/(1 − p_c) = −β for every avg_c: the gradient stays
    finite although d lo/d avg_c = 1/(1 − p_c) blows up. At avg_c = −1e-10 both hold to double precision;
    at avg_c = 0 (clamped to −eps) loss and gradients must be finite.
    """
    output, grads = losses_and_grads(orpo_loss, t(-1e-10), t(-LN2), beta=0.5)
    torch.testing.assert_close(output.losses.detach(), torch.tensor([0.5e-10], dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(grads[0], torch.tensor([-0.5], dtype=torch.float64), rtol=1e-6, atol=0)
    # log(1 − e^x) by log1p(−e^x) alone would be off by 2e-5 relative at −1e-12 (float64) and by 1.3 % at −1e-6
    # (float32): there it needs expm1.
    for dtype, avg, rtol in ((torch.float64, -1e-12, 1e-6), (torch.float32, -1e-6, 1e-4)):
        loss = orpo_loss(torch.tensor([avg], dtype=dtype), torch.tensor([-LN2], dtype=dtype), beta=0.5).losses
        assert loss.item() == pytest.approx(-0.5 * avg, rel=rtol)
    for dtype in (torch.float64, torch.float32):
        chosen = torch.tensor([0.0, -1e-30, 0.0], dtype=dtype, requires_grad=True)
        rejected = torch.tensor([-LN2, -1.0, 0.0], dtype=dtype, requires_grad=True)
        output = orpo_loss(chosen, rejected, beta=0.5)
        output.losses.sum().backward()
        assert torch.isfinite(output.losses).all()
        assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
        assert output.losses[2].item() == pytest.approx(0.5 * LN2)  # equal odds: lo = 0


# --------------------------------------------------------------------------------------------------- KTO


def test_kto_values_gradients_and_class_weights():
    """β = 0.5, z0 = 0, r = π − ref = 0 for all four examples, w_d = 2, w_u = 3.

    desirable: w_d·(1 − σ(0)) = 1, d/d π = −w_d·β·σ(0)·(1 − σ(0)) = −2·0.5/4 = −0.25;
    undesirable: w_u·(1 − σ(0)) = 1.5, d/d π = +w_u·β/4 = +0.375.
    Rewards β·r = 0 split by class; losses stay in batch order.
    """
    is_desirable = torch.tensor([True, False, False, True])
    kl = torch.tensor(0.0, dtype=torch.float64)
    output, grads = losses_and_grads(
        kto_loss, t(-2.0, -3.0, -4.0, -5.0), t(-2.0, -3.0, -4.0, -5.0),
        is_desirable=is_desirable, kl=kl, beta=0.5, desirable_weight=2.0, undesirable_weight=3.0,
    )
    assert_close(output.losses, torch.tensor([1.0, 1.5, 1.5, 1.0], dtype=torch.float64))
    assert_close(grads[0], torch.tensor([-0.25, 0.375, 0.375, -0.25], dtype=torch.float64))
    assert output.chosen_rewards.shape == (2,) and output.rejected_rewards.shape == (2,)


def test_kto_reference_point():
    """β = 1, z0 = ln 3. Desirable with r = 2 ln 3: 1 − σ(ln 3) = 1/4. Undesirable with r = 0:
    1 − σ(z0 − r) = 1 − σ(ln 3) = 1/4. No gradient reaches kl (detached). Rewards β·r: [2 ln 3] and [0].
    """
    kl = torch.tensor(LN3, dtype=torch.float64, requires_grad=True)
    output = kto_loss(t(2 * LN3 - 1, -1.0), t(-1.0, -1.0), torch.tensor([True, False]), kl, beta=1.0)
    output.losses.sum().backward()
    assert_close(output.losses, 0.25)
    assert kl.grad is None
    assert_close(output.chosen_rewards, torch.tensor([2 * LN3], dtype=torch.float64))
    assert_close(output.rejected_rewards, torch.tensor([0.0], dtype=torch.float64))


def test_kto_clamps_negative_kl_and_allows_one_class():
    """A negative kl acts as z0 = 0: same losses as kl = 0. With only desirable examples the rejected
    rewards are empty.
    """
    is_desirable = torch.tensor([True, True])
    policy, ref = torch.tensor([-1.0, -2.0], dtype=torch.float64), torch.tensor([-1.5, -1.0], dtype=torch.float64)
    negative = kto_loss(policy, ref, is_desirable, torch.tensor(-3.0, dtype=torch.float64), beta=0.3)
    zero = kto_loss(policy, ref, is_desirable, torch.tensor(0.0, dtype=torch.float64), beta=0.3)
    torch.testing.assert_close(negative.losses, zero.losses)
    assert negative.rejected_rewards.numel() == 0


def test_kto_kl_estimate():
    """mean(policy − ref) over mismatched pairs, clamped at 0 and detached:
    [0, −1] − [−2, −2] = [2, 1] → 1.5; [−3, −3] − [−1, −1] = [−2, −2] → −2 → 0.
    """
    positive = kto_kl_estimate(t(0.0, -1.0), t(-2.0, -2.0))
    assert positive.item() == pytest.approx(1.5)
    assert not positive.requires_grad
    assert kto_kl_estimate(t(-3.0, -3.0), t(-1.0, -1.0)).item() == 0.0


def test_kto_batch_loss_uses_summed_logps():
    """kto_batch_loss = kto_loss on the summed log-probs with z0 from the mismatched pairs:
    z0 = mean([−1, −2] − [−2, −4]) = mean([1, 2]) = 1.5; β = 1, example r = [1.5, 1.5]:
    desirable 1 − σ(0) = 1/2 (weighted by 2 → 1), undesirable 1 − σ(0) = 1/2 (weighted by 1).
    """
    batch = KTOLogps(
        policy_logps=torch.tensor([-2.5, -4.5], dtype=torch.float64),
        ref_logps=torch.tensor([-4.0, -6.0], dtype=torch.float64),
        is_desirable=torch.tensor([True, False]),
        policy_kl_logps=torch.tensor([-1.0, -2.0], dtype=torch.float64),
        ref_kl_logps=torch.tensor([-2.0, -4.0], dtype=torch.float64),
    )
    output, kl = kto_batch_loss(batch, SimpleNamespace(beta=1.0, desirable_weight=2.0, undesirable_weight=1.0))
    assert_close(output.losses, torch.tensor([1.0, 0.5], dtype=torch.float64))
    assert_close(kl, torch.tensor(1.5, dtype=torch.float64))


# ---------------------------------------------------------------------------------------- NLL and dispatcher


def test_sft_nll():
    """−sum/count per sequence: −(−6)/3 = 2; a count of 0 is treated as 1: −(−3)/1 = 3.
    d nll/d sum = −1/count = [−1/3, −1].
    """
    output = t(-6.0, -3.0)
    nll = sft_nll(output, torch.tensor([3, 0]))
    nll.sum().backward()
    assert_close(nll, torch.tensor([2.0, 3.0], dtype=torch.float64))
    assert_close(output.grad, torch.tensor([-1 / 3, -1.0], dtype=torch.float64))


def make_batch(scale: float = 1.0) -> PreferenceLogps:
    """Two pairs; ``scale`` multiplies both the summed log-probs and the token counts (same averages)."""
    return PreferenceLogps(
        policy_chosen_logps=scale * torch.tensor([-8.0, -3.0], dtype=torch.float64),
        policy_rejected_logps=scale * torch.tensor([-12.0, -9.0], dtype=torch.float64),
        ref_chosen_logps=scale * torch.tensor([-9.0, -4.0], dtype=torch.float64),
        ref_rejected_logps=scale * torch.tensor([-10.0, -6.0], dtype=torch.float64),
        chosen_counts=(scale * torch.tensor([4, 3])).long(),
        rejected_counts=(scale * torch.tensor([6, 3])).long(),
    )


def test_dispatcher_averages_for_ipo_but_not_sigmoid():
    """Doubling every sum and every token count keeps the per-token averages, so IPO is unchanged; the
    summed margin h doubles, so the sigmoid loss changes. IPO equals ipo_loss on sums/counts:
    avg: πc = [−2, −1], πr = [−2, −3], refc = [−2.25, −4/3], refr = [−5/3, −2].
    """
    config = cfg(beta=0.1)
    ipo = preference_loss("ipo", make_batch(), config).losses
    torch.testing.assert_close(preference_loss("ipo", make_batch(2.0), config).losses, ipo)
    expected = ipo_loss(*(torch.tensor(v, dtype=torch.float64) for v in
                          ([-2.0, -1.0], [-2.0, -3.0], [-2.25, -4 / 3], [-5 / 3, -2.0])), beta=0.1).losses
    torch.testing.assert_close(ipo, expected)
    sigmoid = preference_loss("sigmoid", make_batch(), config).losses
    assert not torch.allclose(preference_loss("sigmoid", make_batch(2.0), config).losses, sigmoid)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge"])
def test_dispatcher_uses_sums(loss_type):
    """sigmoid, robust and hinge see the summed log-probs unchanged."""
    batch, config = make_batch(), cfg(beta=0.1, label_smoothing=0.2)
    loss_fn = {"sigmoid": sigmoid_loss, "robust": robust_loss, "hinge": hinge_loss}[loss_type]
    kwargs = {} if loss_type == "hinge" else {"label_smoothing": 0.2}
    expected = loss_fn(batch.policy_chosen_logps, batch.policy_rejected_logps,
                       batch.ref_chosen_logps, batch.ref_rejected_logps, beta=0.1, **kwargs)
    for field, reference in zip(preference_loss(loss_type, batch, config), expected):
        torch.testing.assert_close(field, reference)


def test_dispatcher_averages_for_simpo_and_orpo():
    """simpo and orpo see sums/counts: avg_c = [−2, −1], avg_r = [−2, −3]; ORPO also adds NLL = −avg_c."""
    batch, config = make_batch(), cfg(beta=0.3, simpo_gamma=0.4)
    avg_c, avg_r = torch.tensor([-2.0, -1.0], dtype=torch.float64), torch.tensor([-2.0, -3.0], dtype=torch.float64)
    torch.testing.assert_close(preference_loss("simpo", batch, config).losses,
                               simpo_loss(avg_c, avg_r, beta=0.3, gamma=0.4).losses)
    torch.testing.assert_close(preference_loss("orpo", batch, config).losses,
                               orpo_loss(avg_c, avg_r, beta=0.3).losses - avg_c)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_sft_weight_adds_exactly_the_nll(loss_type):
    """loss(sft_weight = 0.5) − loss(sft_weight = 0) = 0.5·NLL(chosen) = 0.5·[2, 1] for non-ORPO losses.
    ORPO always carries its NLL: weight 1 when sft_weight = 0, so the difference is 0.5·NLL − NLL.
    Rewards are unaffected.
    """
    nll = torch.tensor([2.0, 1.0], dtype=torch.float64)
    with_nll = preference_loss(loss_type, make_batch(), cfg(beta=0.1, label_smoothing=0.1, sft_weight=0.5))
    without = preference_loss(loss_type, make_batch(), cfg(beta=0.1, label_smoothing=0.1, sft_weight=0.0))
    expected = 0.5 * nll - (nll if loss_type == "orpo" else 0.0)
    torch.testing.assert_close(with_nll.losses - without.losses, expected)
    torch.testing.assert_close(with_nll.chosen_rewards, without.chosen_rewards)


def test_sft_weight_gradient():
    """The NLL adds −sft_weight/count to d loss/d πc: with weight 0.5 and count 4, −0.125 more."""
    grads = []
    for sft_weight in (0.0, 0.5):
        batch = make_batch()
        batch.policy_chosen_logps.requires_grad_(True)
        preference_loss("sigmoid", batch, cfg(beta=0.1, sft_weight=sft_weight)).losses.sum().backward()
        grads.append(batch.policy_chosen_logps.grad)
    torch.testing.assert_close(grads[1] - grads[0], torch.tensor([-0.125, -0.5 / 3], dtype=torch.float64))


def test_bf16_log_probs_are_taken_in_float32():
    """bf16 inputs (all exact in bf16) give the float32 losses of the same values: πc = −230, πr = −20.5,
    refc = −229, refr = −20.5, so h = −209.5 − (−208.5) = −1 and the sigmoid loss is −log σ(−0.1) = 0.7444.
    In bf16 arithmetic (8 significant bits: spacing 1 between 128 and 256) −209.5 and −208.5 round to even,
    −210 and −208, giving h = −2 and −log σ(−0.2) = 0.7981."""
    batch = PreferenceLogps(*(torch.tensor(v, dtype=torch.bfloat16) for v in ([-230.0], [-20.5], [-229.0], [-20.5])),
                            chosen_counts=torch.tensor([100]), rejected_counts=torch.tensor([100]))
    assert preference_loss("sigmoid", batch, cfg(beta=0.1)).losses.item() == pytest.approx(0.744397, abs=1e-6)
    widened = PreferenceLogps(*(x.float() for x in (batch.policy_chosen_logps, batch.policy_rejected_logps,
                                                    batch.ref_chosen_logps, batch.ref_rejected_logps)),
                              chosen_counts=batch.chosen_counts, rejected_counts=batch.rejected_counts)
    for loss_type in LOSS_TYPES:
        output = preference_loss(loss_type, batch, cfg(beta=0.1))
        assert output.losses.dtype == torch.float32
        torch.testing.assert_close(output.losses, preference_loss(loss_type, widened, cfg(beta=0.1)).losses)
    kto, _ = kto_batch_loss(bf16_kto_batch(), SimpleNamespace(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0))
    assert kto.losses.dtype == torch.float32


def bf16_kto_batch() -> KTOLogps:
    return KTOLogps(policy_logps=torch.tensor([-230.4, -231.0], dtype=torch.bfloat16),
                    ref_logps=torch.tensor([-230.0, -231.0], dtype=torch.bfloat16),
                    is_desirable=torch.tensor([True, False]),
                    policy_kl_logps=torch.tensor([-5.0], dtype=torch.bfloat16),
                    ref_kl_logps=torch.tensor([-6.0], dtype=torch.bfloat16))


def test_dispatcher_errors():
    with pytest.raises(ValueError, match="sigmoid, robust, ipo, hinge, simpo, orpo"):
        preference_loss("dpo", make_batch(), cfg())
    with pytest.raises(ValueError, match="sft_weight"):
        preference_loss("sigmoid", make_batch(), cfg(sft_weight=-1.0))
    with pytest.raises(ValueError, match="simpo_gamma"):
        preference_loss("simpo", make_batch(), cfg(simpo_gamma=-0.5))
    for beta in (0.0, -0.1):  # constant, or trained towards the rejected responses
        with pytest.raises(ValueError, match="beta must be > 0"):
            preference_loss("orpo", make_batch(), cfg(beta=beta))
        with pytest.raises(ValueError, match="beta must be > 0"):
            kto_batch_loss(bf16_kto_batch(), SimpleNamespace(beta=beta, desirable_weight=1.0, undesirable_weight=1.0))
    batch = make_batch()
    batch.ref_chosen_logps = None
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        preference_loss("ipo", batch, cfg())


# --------------------------------------------------------------------------------------- TRL cross-checks
# TRL 1.16's DPOTrainer computes sigmoid/robust/ipo/hinge inline in DPOTrainer._compute_loss, which needs a
# model forward, so it cannot be called on its own. CPOTrainer.cpo_loss and ORPOTrainer.odds_ratio_loss are
# methods that only read attributes of `self`, so they are called unbound with a stub. cpo_loss applies the
# DPO-family formula to logits = (its chosen input − its rejected input); feeding it the log-ratios
# πc − refc and πr − refr makes those logits equal to h, which checks f(β, h) for sigmoid (with TRL's
# label_smoothing, i.e. cDPO), hinge and ipo. rDPO exists only inside DPOTrainer._compute_loss: no cross-check.


@pytest.fixture(scope="module")
def trl_losses():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo.cpo_trainer import CPOTrainer
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer
    return CPOTrainer.cpo_loss, ORPOTrainer.odds_ratio_loss


def trl_stub(**attributes) -> SimpleNamespace:
    return SimpleNamespace(alpha=0.0, accelerator=SimpleNamespace(device=torch.device("cpu")), **attributes)


RANDOM = torch.Generator().manual_seed(0)
LOGPS = [-30 * torch.rand(16, generator=RANDOM, dtype=torch.float64) for _ in range(4)]
AVGS = [-3 * torch.rand(16, generator=RANDOM, dtype=torch.float64) - 1e-3 for _ in range(4)]


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing", "inputs"),
    [("sigmoid", 0.0, LOGPS), ("sigmoid", 0.15, LOGPS), ("hinge", 0.0, LOGPS), ("ipo", 0.0, AVGS)],
)
def test_dpo_family_matches_trl(trl_losses, loss_type, label_smoothing, inputs):
    cpo_loss, _ = trl_losses
    beta = 0.2
    stub = trl_stub(beta=beta, label_smoothing=label_smoothing, loss_type=loss_type, simpo_gamma=0.0)
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = inputs
    expected = cpo_loss(stub, policy_chosen - ref_chosen, policy_rejected - ref_rejected)
    loss_fn = {"sigmoid": sigmoid_loss, "hinge": hinge_loss, "ipo": ipo_loss}[loss_type]
    kwargs = {"label_smoothing": label_smoothing} if loss_type == "sigmoid" else {}
    output = loss_fn(*inputs, beta=beta, **kwargs)
    for field, reference in zip(output, expected):
        torch.testing.assert_close(field, reference)


def test_simpo_matches_trl(trl_losses):
    """TRL's simpo_gamma is γ in reward units, like ours."""
    cpo_loss, _ = trl_losses
    stub = trl_stub(beta=2.5, label_smoothing=0.0, loss_type="simpo", simpo_gamma=1.4)
    expected = cpo_loss(stub, AVGS[0], AVGS[1])
    for field, reference in zip(simpo_loss(AVGS[0], AVGS[1], beta=2.5, gamma=1.4), expected):
        torch.testing.assert_close(field, reference)


def test_orpo_matches_trl(trl_losses):
    """TRL returns +β·log σ(lo) (subtracted from the NLL) and computes in float32."""
    _, odds_ratio_loss = trl_losses
    losses, chosen_rewards, rejected_rewards, _, _ = odds_ratio_loss(trl_stub(beta=0.25), AVGS[0], AVGS[1])
    output = orpo_loss(AVGS[0], AVGS[1], beta=0.25)
    torch.testing.assert_close(output.losses, -losses.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.chosen_rewards, chosen_rewards.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.rejected_rewards, rejected_rewards.double(), rtol=1e-5, atol=1e-6)
