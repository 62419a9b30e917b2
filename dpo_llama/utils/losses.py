"""Preference losses: DPO and its relatives, SimPO, ORPO and KTO.

Every loss works on per-sequence tensors of shape ``[B]``. Names ending in ``_logps`` are SUMS of the token
log-probs of a response; names ending in ``_avg`` are those sums divided by the number of scored tokens.
Each loss returns a :class:`LossOutput` with one loss per example (the caller takes the mean) and the
implicit rewards for logging, detached from the graph.

The DPO-family losses share the implicit-reward margin

    h = (log π(y_c|x) − log π(y_r|x)) − (log π_ref(y_c|x) − log π_ref(y_r|x)),

where ``c`` is the chosen and ``r`` the rejected response of a pair, ``π`` the policy being trained and
``π_ref`` the frozen reference model. ``β`` scales the margin (smaller ``β``: the policy may drift further
from the reference).

The trainer calls :func:`preference_loss` for paired data and :func:`kto_batch_loss` for unpaired KTO data;
both do the sum → per-token-average normalisation that each loss expects.
"""

from dataclasses import dataclass, fields, replace
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "simpo", "orpo")
AVERAGED_LOSS_TYPES = ("ipo", "simpo", "orpo")
REFERENCE_FREE_LOSS_TYPES = ("simpo", "orpo")


class LossOutput(NamedTuple):
    """Per-example losses and detached implicit rewards.

    Attributes:
        losses: Loss of each example, shape ``[B]``.
        chosen_rewards: Reward of each chosen response (KTO: of each desirable example).
        rejected_rewards: Reward of each rejected response (KTO: of each undesirable example).
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def _margin(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor
) -> Tensor:
    """Implicit-reward margin ``h = (πc − πr) − (refc − refr)``."""
    return (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)


def _rewards(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """Detached DPO implicit rewards ``β·(π − ref)`` for the chosen and the rejected responses."""
    chosen = beta * (policy_chosen - ref_chosen).detach()
    rejected = beta * (policy_rejected - ref_rejected).detach()
    return chosen, rejected


def _check_beta(beta: float) -> None:
    """Every loss here needs β > 0: β = 0 makes it constant and β < 0 trains towards the rejected responses."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO loss (Rafailov et al. 2023, "Direct Preference Optimization"), optionally conservative (cDPO).

    loss = −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)

    with ``h`` the margin of summed log-probs (module docstring). ``ε = 0`` is DPO; ``ε > 0`` is cDPO
    (Mitchell 2023, "A note on DPO with noisy preferences"), which assumes each label is flipped with
    probability ε and so never pushes ``h`` to infinity. ``d loss/d πc = −β·((1 − ε)·σ(−βh) − ε·σ(βh))``.

    Args:
        policy_chosen_logps: Summed log-probs of the chosen responses under the policy, ``[B]``.
        policy_rejected_logps: Same for the rejected responses, ``[B]``.
        ref_chosen_logps: Summed log-probs of the chosen responses under the reference, ``[B]``.
        ref_rejected_logps: Same for the rejected responses, ``[B]``.
        beta: Inverse temperature β > 0.
        label_smoothing: Assumed label-flip probability ε in [0, 0.5].

    Returns:
        Losses ``[B]`` and rewards ``β·(π − ref)`` on summed log-probs.

    Raises:
        ValueError: If ``label_smoothing`` is outside [0, 0.5].
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"sigmoid loss needs label_smoothing in [0, 0.5], got {label_smoothing}")
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    rewards = _rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return LossOutput(losses, *rewards)


def robust_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float,
) -> LossOutput:
    """Robust DPO loss (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback").

    loss = (−(1 − ε)·log σ(β·h) + ε·log σ(−β·h)) / (1 − 2ε)

    An unbiased estimate of the clean DPO loss when each label is flipped with probability ε: averaging
    over the noise, ``(1 − ε)·loss(h) + ε·loss(−h) = −log σ(β·h)``. Unlike cDPO it keeps pushing ``h`` up.

    Args:
        policy_chosen_logps: Summed log-probs of the chosen responses under the policy, ``[B]``.
        policy_rejected_logps: Same for the rejected responses, ``[B]``.
        ref_chosen_logps: Summed log-probs of the chosen responses under the reference, ``[B]``.
        ref_rejected_logps: Same for the rejected responses, ``[B]``.
        beta: Inverse temperature β > 0.
        label_smoothing: Label-flip probability ε in [0, 0.5).

    Returns:
        Losses ``[B]`` and rewards ``β·(π − ref)`` on summed log-probs.

    Raises:
        ValueError: If ``label_smoothing`` is outside [0, 0.5).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust loss needs label_smoothing in [0, 0.5), got {label_smoothing}")
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * h)
    flipped = label_smoothing * F.logsigmoid(-beta * h)
    losses = (clean + flipped) / (1 - 2 * label_smoothing)
    rewards = _rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return LossOutput(losses, *rewards)


def ipo_loss(
    policy_chosen_avg: Tensor,
    policy_rejected_avg: Tensor,
    ref_chosen_avg: Tensor,
    ref_rejected_avg: Tensor,
    beta: float,
) -> LossOutput:
    """IPO loss (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", Eq. 17, where β is their τ).

    loss = (h − 1/(2β))²

    with ``h`` the margin of per-token AVERAGED log-probs. IPO regresses ``h`` onto the fixed target
    ``1/(2β)`` instead of pushing it to infinity, so the loss is 0 with zero gradient at ``h = 1/(2β)``.
    On summed log-probs ``h`` grows with response length and a fixed target would mean something different
    for every length; TRL therefore averages per token, a choice its authors confirmed with the IPO authors.

    Args:
        policy_chosen_avg: Per-token average log-probs of the chosen responses under the policy, ``[B]``.
        policy_rejected_avg: Same for the rejected responses, ``[B]``.
        ref_chosen_avg: Per-token average log-probs of the chosen responses under the reference, ``[B]``.
        ref_rejected_avg: Same for the rejected responses, ``[B]``.
        beta: Regularisation strength β > 0.

    Returns:
        Losses ``[B]`` and rewards ``β·(π − ref)`` on averaged log-probs.

    Raises:
        ValueError: If ``beta`` is not positive.
    """
    _check_beta(beta)
    h = _margin(policy_chosen_avg, policy_rejected_avg, ref_chosen_avg, ref_rejected_avg)
    losses = (h - 1 / (2 * beta)) ** 2
    rewards = _rewards(policy_chosen_avg, policy_rejected_avg, ref_chosen_avg, ref_rejected_avg, beta)
    return LossOutput(losses, *rewards)


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> LossOutput:
    """Hinge loss on the normalised likelihood (Liu et al. 2023, "Statistical Rejection Sampling Improves
    Preference Optimization", RSO; TRL's ``loss_type="hinge"``).

    loss = relu(1 − β·h)

    with ``h`` the margin of summed log-probs. The loss, and its gradient, are zero once ``β·h ≥ 1``. It equals
    ``β·relu(1/β − h)``: the calibration loss of SLiC-HF (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood
    Calibration with Human Feedback"), ``relu(δ − log π(y_c|x) + log π(y_r|x))``, with δ = 1/β, the reference's
    log-ratio subtracted and scaled by β.

    Args:
        policy_chosen_logps: Summed log-probs of the chosen responses under the policy, ``[B]``.
        policy_rejected_logps: Same for the rejected responses, ``[B]``.
        ref_chosen_logps: Summed log-probs of the chosen responses under the reference, ``[B]``.
        ref_rejected_logps: Same for the rejected responses, ``[B]``.
        beta: Margin scale β > 0 (the hinge margin is 1/β in log-prob units).

    Returns:
        Losses ``[B]`` and rewards ``β·(π − ref)`` on summed log-probs.
    """
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.relu(1 - beta * h)
    rewards = _rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return LossOutput(losses, *rewards)


def simpo_loss(policy_chosen_avg: Tensor, policy_rejected_avg: Tensor, beta: float, gamma: float) -> LossOutput:
    """SimPO loss (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward").

    loss = −log σ(β·(avg_c − avg_r) − γ)

    Reference-free: the reward of a response is its per-token average log-prob times β, and the chosen
    reward must beat the rejected one by the target margin γ. Here ``gamma`` is γ in reward units, the
    same quantity as TRL's ``CPOConfig.simpo_gamma`` (TRL subtracts ``simpo_gamma / beta`` from the
    log-prob gap before scaling by β). The SimPO authors' code instead stores the ratio
    ``gamma_beta_ratio = γ/β``; convert with ``gamma = gamma_beta_ratio * beta``.

    Args:
        policy_chosen_avg: Per-token average log-probs of the chosen responses under the policy, ``[B]``.
        policy_rejected_avg: Same for the rejected responses, ``[B]``.
        beta: Reward scale β > 0 (the paper uses 2 to 10).
        gamma: Target reward margin γ ≥ 0.

    Returns:
        Losses ``[B]`` and rewards ``β·avg`` of the policy.
    """
    logits = beta * (policy_chosen_avg - policy_rejected_avg) - gamma
    losses = -F.logsigmoid(logits)
    return LossOutput(losses, beta * policy_chosen_avg.detach(), beta * policy_rejected_avg.detach())


def _log1m_exp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x < 0``, accurate on both sides of ``x = −ln 2`` (Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(policy_chosen_avg: Tensor, policy_rejected_avg: Tensor, beta: float) -> LossOutput:
    """Odds-ratio term of ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without
    Reference Model", Eqs. 4-7, with β as their λ).

    With p = exp(avg) the per-token geometric-mean probability and odds(p) = p/(1 − p):

        lo   = log(odds(p_c)/odds(p_r)) = (avg_c − avg_r) − (log(1 − exp(avg_c)) − log(1 − exp(avg_r)))
        loss = −β·log σ(lo)

    ORPO's full objective is NLL(chosen) + this term; the NLL is added by the caller
    (:func:`preference_loss` does it through the SFT weight, see :func:`sft_nll`).

    As avg → 0⁻ the odds go to infinity; ``log(1 − exp(avg))`` is computed with ``expm1`` there, and avg is
    clamped to at most −(machine epsilon) so that avg = 0 exactly (a token predicted with probability 1 in
    float32) gives a finite loss. The clamp also zeroes the gradient of an average above −eps (about −1.2e-7
    in float32), where a rejected response's exact gradient is about β/|avg| (over 10⁶·β). A float32
    log-softmax resolves log-probs that close to 0 only to about their own size, so such averages are
    rounding noise; an average just below the ceiling still gets its full gradient.

    Args:
        policy_chosen_avg: Per-token average log-probs of the chosen responses under the policy, ``[B]``.
        policy_rejected_avg: Same for the rejected responses, ``[B]``.
        beta: Weight β > 0 of the odds-ratio term relative to the NLL (the paper's λ, 0.1 to 1).

    Returns:
        Losses ``[B]`` and rewards ``β·avg`` of the policy.
    """
    ceiling = -torch.finfo(policy_chosen_avg.dtype).eps
    chosen = policy_chosen_avg.clamp(max=ceiling)
    rejected = policy_rejected_avg.clamp(max=ceiling)
    log_odds = (chosen - rejected) - (_log1m_exp(chosen) - _log1m_exp(rejected))
    losses = -beta * F.logsigmoid(log_odds)
    return LossOutput(losses, beta * policy_chosen_avg.detach(), beta * policy_rejected_avg.detach())


def kto_kl_estimate(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO reference point z0: a batch estimate of KL(π ‖ π_ref) (Ethayarajh et al. 2024, Eq. 7).

    z0 = max(0, mean_i (log π(y_j|x_i) − log π_ref(y_j|x_i)))

    over MISMATCHED pairs (prompt i, completion j ≠ i) of the batch, so that the estimate does not share
    the examples' own rewards. Detached (no gradient flows through z0) and clamped at 0 since a KL is
    never negative, as in TRL.

    Args:
        policy_kl_logps: Summed policy log-probs of the mismatched completions, ``[B]``.
        ref_kl_logps: Summed reference log-probs of the same completions, ``[B]``.

    Returns:
        Scalar tensor z0 ≥ 0.
    """
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    is_desirable: Tensor,
    kl: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO loss (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 7), as in TRL.

    With r = log π(y|x) − log π_ref(y|x) and z0 = max(0, kl) (detached):

        desirable:   w_d·(1 − σ(β·(r − z0)))
        undesirable: w_u·(1 − σ(β·(z0 − r)))

    Examples are unpaired; ``w_d``, ``w_u`` balance the two classes (the paper advises
    ``w_d·n_d / (w_u·n_u)`` in [1, 4/3]).

    Args:
        policy_logps: Summed log-probs of each completion under the policy, ``[B]``.
        ref_logps: Same under the reference, ``[B]``.
        is_desirable: Bool ``[B]``, True for desirable (thumbs-up) examples.
        kl: Scalar reference point, usually from :func:`kto_kl_estimate`.
        beta: Inverse temperature β > 0.
        desirable_weight: w_d.
        undesirable_weight: w_u.

    Returns:
        Losses ``[B]`` in batch order; rewards ``β·r`` of the desirable examples as ``chosen_rewards`` and of
        the undesirable ones as ``rejected_rewards`` (either may be empty).
    """
    z0 = kl.detach().clamp(min=0)
    logratios = policy_logps - ref_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios)))
    losses = torch.where(is_desirable, desirable, undesirable)
    rewards = beta * logratios.detach()
    return LossOutput(losses, rewards[is_desirable], rewards[~is_desirable])


def sft_nll(chosen_logps_sum: Tensor, chosen_token_counts: Tensor) -> Tensor:
    """Per-sequence average negative log-likelihood of the chosen responses.

    nll = −(Σ_t log π(y_t | x, y_<t)) / |y|

    The extra term of RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization":
    L = L_DPO + α·nll) and of ORPO (L = nll + L_OR); the caller adds ``sft_weight · nll``.

    Args:
        chosen_logps_sum: Summed log-probs of the chosen responses under the policy, ``[B]``.
        chosen_token_counts: Number of scored tokens of each chosen response, ``[B]`` (0 is treated as 1).

    Returns:
        NLL per sequence, ``[B]``.
    """
    return -chosen_logps_sum / chosen_token_counts.to(chosen_logps_sum.dtype).clamp(min=1)


def _at_least_float32(batch):
    """The same dataclass of tensors with its bf16/fp16 ones in float32: in bf16 a log-prob near −230 is
    rounded to a multiple of 1, more than a typical margin (and ORPO's clamp ceiling would be −2⁻⁷)."""
    values = {f.name: getattr(batch, f.name) for f in fields(batch)}
    return replace(batch, **{name: value.to(torch.promote_types(value.dtype, torch.float32))
                             for name, value in values.items()
                             if isinstance(value, Tensor) and value.is_floating_point()})


@dataclass
class PreferenceLogps:
    """Summed log-probs of one batch of (chosen, rejected) pairs, all ``[B]``.

    Attributes:
        policy_chosen_logps: Policy log-probs of the chosen responses (with grad).
        policy_rejected_logps: Policy log-probs of the rejected responses (with grad).
        ref_chosen_logps: Reference log-probs of the chosen responses; None for reference-free losses.
        ref_rejected_logps: Reference log-probs of the rejected responses; None for reference-free losses.
        chosen_counts: Number of scored tokens of each chosen response.
        rejected_counts: Number of scored tokens of each rejected response.
    """

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    ref_chosen_logps: Tensor | None
    ref_rejected_logps: Tensor | None
    chosen_counts: Tensor
    rejected_counts: Tensor

    def averaged(self) -> "PreferenceLogps":
        """The same batch with every log-prob divided by its response's token count (0 counts as 1)."""

        def per_token(logps: Tensor | None, counts: Tensor) -> Tensor | None:
            return None if logps is None else logps / counts.to(logps.dtype).clamp(min=1)

        return PreferenceLogps(
            per_token(self.policy_chosen_logps, self.chosen_counts),
            per_token(self.policy_rejected_logps, self.rejected_counts),
            per_token(self.ref_chosen_logps, self.chosen_counts),
            per_token(self.ref_rejected_logps, self.rejected_counts),
            self.chosen_counts,
            self.rejected_counts,
        )


class PreferenceLossConfig(Protocol):
    """The config attributes :func:`preference_loss` reads (any object that has them will do)."""

    beta: float
    label_smoothing: float
    simpo_gamma: float
    sft_weight: float


def _paired_loss(loss_type: str, batch: PreferenceLogps, cfg: PreferenceLossConfig) -> LossOutput:
    """Run one paired loss on the normalisation it expects: sums, or per-token averages."""
    if loss_type in AVERAGED_LOSS_TYPES:
        batch = batch.averaged()
    policy = (batch.policy_chosen_logps, batch.policy_rejected_logps)
    if loss_type == "simpo":
        return simpo_loss(*policy, cfg.beta, cfg.simpo_gamma)
    if loss_type == "orpo":
        return orpo_loss(*policy, cfg.beta)
    if batch.ref_chosen_logps is None or batch.ref_rejected_logps is None:
        raise ValueError(f"loss_type {loss_type!r} needs ref_chosen_logps and ref_rejected_logps, got None")
    logps = (*policy, batch.ref_chosen_logps, batch.ref_rejected_logps)
    if loss_type == "sigmoid":
        return sigmoid_loss(*logps, cfg.beta, cfg.label_smoothing)
    if loss_type == "robust":
        return robust_loss(*logps, cfg.beta, cfg.label_smoothing)
    if loss_type == "ipo":
        return ipo_loss(*logps, cfg.beta)
    return hinge_loss(*logps, cfg.beta)


def _nll_weight(loss_type: str, sft_weight: float) -> float:
    """Weight of the chosen-response NLL: ``sft_weight``, or 1 (the paper's) for ORPO when it is 0."""
    if loss_type == "orpo" and sft_weight == 0:
        return 1.0
    return sft_weight


def preference_loss(loss_type: str, batch: PreferenceLogps, cfg: PreferenceLossConfig) -> LossOutput:
    """Per-pair loss of one batch for any paired ``loss_type`` in :data:`LOSS_TYPES`.

    sigmoid (DPO/cDPO), robust and hinge use summed log-probs; ipo, simpo and orpo use per-token averages.
    When the NLL weight is positive, ``weight · sft_nll(chosen)`` is added to every example's loss:
    RPO when combined with a DPO-family loss, and always for ORPO, whose objective includes it. bf16/fp16
    log-probs are taken in float32.

    Args:
        loss_type: One of :data:`LOSS_TYPES`.
        batch: Summed log-probs and token counts of the pairs.
        cfg: Provides ``beta``, ``label_smoothing``, ``simpo_gamma`` and ``sft_weight``.

    Returns:
        Losses ``[B]`` (NLL included) and detached rewards.

    Raises:
        ValueError: For an unknown ``loss_type``, ``beta`` <= 0, a negative ``sft_weight`` or ``simpo_gamma``,
            or missing reference log-probs for a loss that needs them.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    _check_beta(cfg.beta)
    if min(cfg.sft_weight, cfg.simpo_gamma) < 0:
        raise ValueError(f"sft_weight and simpo_gamma must be >= 0, got {cfg.sft_weight} and {cfg.simpo_gamma}")
    batch = _at_least_float32(batch)
    output = _paired_loss(loss_type, batch, cfg)
    nll_weight = _nll_weight(loss_type, cfg.sft_weight)
    if nll_weight == 0:
        return output
    nll = sft_nll(batch.policy_chosen_logps, batch.chosen_counts)
    return output._replace(losses=output.losses + nll_weight * nll)


@dataclass
class KTOLogps:
    """Summed log-probs of one batch of unpaired KTO examples, all ``[B]``.

    Attributes:
        policy_logps: Policy log-probs of each completion (with grad).
        ref_logps: Reference log-probs of each completion.
        is_desirable: Bool, True for desirable examples.
        policy_kl_logps: Policy log-probs of mismatched (prompt i, completion j ≠ i) pairs: the batch's, or
            those of a whole optimizer step of several micro-batches (any length).
        ref_kl_logps: Reference log-probs of the same mismatched pairs.
    """

    policy_logps: Tensor
    ref_logps: Tensor
    is_desirable: Tensor
    policy_kl_logps: Tensor
    ref_kl_logps: Tensor


class KTOLossConfig(Protocol):
    """The config attributes :func:`kto_batch_loss` reads (any object that has them will do)."""

    beta: float
    desirable_weight: float
    undesirable_weight: float


def kto_batch_loss(batch: KTOLogps, cfg: KTOLossConfig) -> tuple[LossOutput, Tensor]:
    """KTO loss of one unpaired batch, with z0 estimated from the batch's mismatched pairs.

    Rewards and z0 both use SUMMED log-probs, as in the paper and TRL: z0 estimates a KL between whole
    responses, and it is compared with whole-response log-ratios, so both must be on the same scale. bf16/fp16
    log-probs are taken in float32.

    Args:
        batch: Summed log-probs of the examples and of the mismatched pairs.
        cfg: Provides ``beta``, ``desirable_weight`` and ``undesirable_weight``.

    Returns:
        ``(output, z0)``: losses ``[B]`` in batch order with the rewards of desirable / undesirable examples,
        and the detached KL estimate z0 used as the reference point.

    Raises:
        ValueError: If ``beta`` <= 0.
    """
    _check_beta(cfg.beta)
    batch = _at_least_float32(batch)
    kl = kto_kl_estimate(batch.policy_kl_logps, batch.ref_kl_logps)
    output = kto_loss(
        batch.policy_logps,
        batch.ref_logps,
        batch.is_desirable,
        kl,
        cfg.beta,
        cfg.desirable_weight,
        cfg.undesirable_weight,
    )
    return output, kl
