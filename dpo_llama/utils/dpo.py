"""DPO-family training on a preference dataset: batching, the per-batch loss and metrics, the start check.

A paired micro-batch of B pairs is ONE forward pass over 2B sequences, chosen rows first, then rejected
(``prompt + chosen`` / ``prompt + rejected``, right-padded). Policy log-probs are gathered at exactly the
scored positions — the first response token included — and compared with the reference log-probs stored in
the dataset. The trainer averages the summed loss over the pairs of the whole optimizer step.

Reported metrics (per pair, train and validation): ``rewards/chosen``, ``rewards/rejected`` (β-scaled
implicit rewards, on the log-probs the loss uses: per-token averages for ipo, simpo and orpo, where TRL reports
IPO's on sums), ``rewards/accuracies`` (share of pairs with chosen reward > rejected reward),
``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (policy, summed over scored tokens); KTO reports
``kl`` (the z0 estimate), ``rewards/accuracies`` (share of examples whose reward has the sign of its label),
``rewards/margins`` (the reward times +1 for desirable, -1 for undesirable, averaged over examples; TRL's KTO
margin is the desirable examples' mean reward minus the undesirable ones') and ``logps/completion`` (policy,
desirable and undesirable completions alike).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from dpo_llama.utils.logprobs import sequence_logps
from dpo_llama.utils.losses import KTOLogps, PreferenceLogps, kto_batch_loss, preference_loss
from dpo_llama.utils.preference_data import TokenSequence, completion_sequence, kl_sequence, paired_sequences
from dpo_llama.utils.sft import pad_sequences

PLOTS = (
    ("loss", ("train/loss", "val/loss")),
    ("reward accuracy", ("train/rewards/accuracies", "val/rewards/accuracies")),
    ("reward margin", ("train/rewards/margins", "val/rewards/margins")),
)


def pad_batch(sequences: Sequence[TokenSequence],
              pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[N, T]`` right-padded tokens and score mask, and ``[N]`` lengths, from ``(ids, mask)`` sequences."""
    return (pad_sequences([ids for ids, _ in sequences], pad_id, torch.long),
            pad_sequences([mask for _, mask in sequences], False, torch.bool),
            torch.tensor([len(ids) for ids, _ in sequences]))


def collate_pairs(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen sequences in rows ``0..B-1``, rejected in ``B..2B-1``, plus the stored reference log-probs when
    the data has them (data built with ``--no-reference`` serves only the reference-free losses)."""
    chosen, rejected = zip(*(paired_sequences(e) for e in examples))
    tokens, mask, lengths = pad_batch([*chosen, *rejected], pad_id)
    batch = {"tokens": tokens, "mask": mask, "lengths": lengths}
    if "ref_chosen_logps" in examples[0]:
        batch["ref_chosen"] = torch.tensor([float(e["ref_chosen_logps"]) for e in examples])
        batch["ref_rejected"] = torch.tensor([float(e["ref_rejected_logps"]) for e in examples])
    return batch


def collate_unpaired(examples: Sequence[dict], pad_id: int, max_seq_len: int) -> dict[str, torch.Tensor]:
    """KTO batch: the completions, their mismatched KL sequences, labels and reference log-probs."""
    tokens, mask, lengths = pad_batch([completion_sequence(e) for e in examples], pad_id)
    kl_tokens, kl_mask, kl_lengths = pad_batch([kl_sequence(e, max_seq_len) for e in examples], pad_id)
    return {"tokens": tokens, "mask": mask, "lengths": lengths, "kl_tokens": kl_tokens, "kl_mask": kl_mask,
            "kl_lengths": kl_lengths,
            "desirable": torch.tensor([bool(e["desirable"]) for e in examples]),
            "ref_logps": torch.tensor([float(e["ref_logps"]) for e in examples]),
            "ref_kl_logps": torch.tensor([float(e["ref_kl_logps"]) for e in examples])}


def num_units(batch: dict[str, torch.Tensor]) -> int:
    """Pairs (or KTO examples) in a batch: the unit the loss is averaged over."""
    return len(batch["desirable"]) if "desirable" in batch else len(batch["tokens"]) // 2


def example_length(example: dict) -> int:
    """Row length an example brings to a batch (for ``--group-by-length``): prompt plus its longer response."""
    if "completion" in example:
        return len(example["prompt"]) + len(example["completion"])
    return len(example["prompt"]) + max(len(example["chosen"]), len(example["rejected"]))


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Token positions processed by the policy forward passes (padding included)."""
    return batch["tokens"].numel() + (batch["kl_tokens"].numel() if "kl_tokens" in batch else 0)


def policy_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> PreferenceLogps:
    """One forward over the 2B sequences; returns the pairs' summed log-probs and token counts."""
    sums, counts = sequence_logps(model, batch["tokens"], batch["mask"], lengths=batch.get("lengths"))
    n = num_units(batch)
    return PreferenceLogps(policy_chosen_logps=sums[:n], policy_rejected_logps=sums[n:],
                           ref_chosen_logps=batch.get("ref_chosen"), ref_rejected_logps=batch.get("ref_rejected"),
                           chosen_counts=counts[:n], rejected_counts=counts[n:])


def with_aux_loss(model: nn.Module, loss_sum: torch.Tensor, units: int, weight: float, metrics: dict) -> torch.Tensor:
    """Adds a MoE model's load-balancing loss once per unit (so it averages to ``weight · aux``)."""
    aux = model.aux_loss() if hasattr(model, "aux_loss") else None
    if aux is None or weight <= 0:
        return loss_sum
    metrics["aux_loss"] = aux.detach() * units
    return loss_sum + weight * aux * units


def paired_loss(model: nn.Module, batch: dict[str, torch.Tensor], cfg) -> tuple[torch.Tensor, dict]:
    """Summed ``cfg.loss_type`` loss of a paired batch and its metric sums."""
    logps = policy_logps(model, batch)
    out = preference_loss(cfg.loss_type, logps, cfg)
    metrics = {
        "rewards/chosen": out.chosen_rewards.sum(), "rewards/rejected": out.rejected_rewards.sum(),
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().sum(),
        "rewards/margins": (out.chosen_rewards - out.rejected_rewards).sum(),
        "logps/chosen": logps.policy_chosen_logps.detach().sum(),
        "logps/rejected": logps.policy_rejected_logps.detach().sum(),
    }
    return with_aux_loss(model, out.losses.sum(), num_units(batch), cfg.aux_loss_weight, metrics), metrics


@torch.no_grad()
def kl_logps(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy and reference log-probs of the mismatched (KL) pairs of ``batches``; no gradient (as in TRL)."""
    policy = torch.cat([sequence_logps(model, batch["kl_tokens"], batch["kl_mask"],
                                       lengths=batch.get("kl_lengths"))[0] for batch in batches])
    return policy, torch.cat([batch["ref_kl_logps"] for batch in batches])


def add_step_kl_logps(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> None:
    """KTO's reference point over a whole optimizer step (the trainer's ``prepare_step``).

    Gives every micro-batch the log-probs of ALL the step's mismatched pairs (``step_kl_logps``,
    ``step_ref_kl_logps``), so z0 is one estimate over the step and N micro-batches train as one batch of their
    union would; per micro-batch, z0 would come from fewer pairs (from a single pair at micro-batch size 1).
    """
    policy, reference = kl_logps(model, batches)
    for batch in batches:
        batch["step_kl_logps"], batch["step_ref_kl_logps"] = policy, reference


def kto_loss(model: nn.Module, batch: dict[str, torch.Tensor], cfg) -> tuple[torch.Tensor, dict]:
    """Summed KTO loss of an unpaired batch, with z0 from the step's mismatched pairs (:func:`add_step_kl_logps`,
    in training and validation) or, without them, from the batch's own."""
    if "step_kl_logps" in batch:
        policy_kl, ref_kl = batch["step_kl_logps"], batch["step_ref_kl_logps"]
    else:
        policy_kl, ref_kl = kl_logps(model, [batch])
    policy, _ = sequence_logps(model, batch["tokens"], batch["mask"], lengths=batch.get("lengths"))
    logps = KTOLogps(policy_logps=policy, ref_logps=batch["ref_logps"], is_desirable=batch["desirable"],
                     policy_kl_logps=policy_kl, ref_kl_logps=ref_kl)
    out, kl = kto_batch_loss(logps, cfg)
    rewards = cfg.beta * (policy.detach() - batch["ref_logps"])
    signed = torch.where(batch["desirable"], rewards, -rewards)
    units = num_units(batch)
    metrics = {"kl": kl * units, "rewards/accuracies": (signed > 0).float().sum(), "rewards/margins": signed.sum(),
               "logps/completion": policy.detach().sum()}
    return with_aux_loss(model, out.losses.sum(), units, cfg.aux_loss_weight, metrics), metrics


@torch.no_grad()
def reference_check(model: nn.Module, batch: dict[str, torch.Tensor], cfg) -> dict[str, float]:
    """Measures "policy = reference" on one batch before any update.

    With the policy loaded exactly as the reference was (same weights, quantization, dtype) and every LoRA
    B = 0, the policy's log-probs equal the stored ones. Pairs: DPO's sigmoid loss is then ``h = 0`` and
    ``loss = -log σ(0) = ln 2`` with zero rewards; KTO examples: their completions and their KL completions are
    compared. Returns the largest absolute summed log-prob difference and the largest per scored token (a
    sequence's difference over its scored tokens: bf16 results depend slightly on the padded length, so the
    sums of long sequences drift), the mean |reward| at β = ``cfg.beta``, the number of pairs (and the sigmoid
    loss) or of examples.
    """
    was_training = model.training
    model.eval()
    scored = batch["mask"][:, 1:].sum(dim=-1)
    try:
        if "desirable" in batch:
            rewards = sequence_logps(model, batch["tokens"], batch["mask"], lengths=batch["lengths"])[0] \
                - batch["ref_logps"]
            policy_kl, ref_kl = kl_logps(model, [batch])
            diff = torch.cat([rewards, policy_kl - ref_kl])
            scored = torch.cat([scored, batch["kl_mask"][:, 1:].sum(dim=-1)])
            result = {"examples": len(rewards)}
        else:
            logps = policy_logps(model, batch)
            chosen = logps.policy_chosen_logps - logps.ref_chosen_logps
            rejected = logps.policy_rejected_logps - logps.ref_rejected_logps
            rewards = diff = torch.cat([chosen, rejected])
            loss = torch.nn.functional.softplus(-cfg.beta * (chosen - rejected)).mean()
            result = {"sigmoid_loss": float(loss), "ln2": math.log(2), "pairs": len(chosen)}
    finally:
        model.train(was_training)
    return {"max_abs_logp_diff": float(diff.abs().max()),
            "max_abs_logp_diff_per_token": float((diff.abs() / scored.clamp(min=1)).max()),
            "mean_abs_reward": float(cfg.beta * rewards.abs().mean()), **result}
