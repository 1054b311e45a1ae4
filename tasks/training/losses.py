"""The preference-loss family: DPO (sigmoid), IPO, hinge, SimPO, ORPO, plus the RPO NLL term.

Every loss here is a pure, unreduced function of per-sequence log-probabilities, shape (B,), and
returns per-example losses with detached rewards; the training loop calls ``.mean()``.
``preference_loss`` is the one entry point the loop uses: it applies the options (length
normalisation, reference-free, rpo_alpha) and dispatches on ``LossSettings.loss_type``.

Conventions
- A "log-prob" of a completion is the SUM of its token log-probs (prompt tokens excluded);
  ``SeqLogps`` carries the completion token counts so that averages can be taken here.
- Log-ratio of a completion = policy log-prob − reference log-prob. Reward = β · log-ratio for the
  reference-based losses, β · (length-averaged log-prob) for SimPO and ORPO (as TRL's CPO/ORPO).
- Everything is computed in float32 whatever the model's dtype: the inputs are (B,) vectors, so the
  cost is nil, and bf16 log-probs lose the small differences these losses live on.

Where this departs from TRL 1.16 (``DPOTrainer``; ``experimental`` ``CPOTrainer`` / ``ORPOTrainer``)
- RPO: TRL 1.16 has no ``rpo_alpha``; its equivalent is ``loss_type=["sigmoid", "sft"]`` with
  ``loss_weights=[1, α]``, where "sft" is ONE token-weighted mean NLL over all chosen tokens of the
  batch. Here the NLL is per sequence (mean over its own tokens), then averaged over the batch by
  the loop (sequence-weighted, as the RPO and ORPO papers write it). Equal when all chosen
  completions have the same length.
- ``normalize_by_length`` (the reference service's ``dpo_normalize_logratios_by_length``) is TRL's
  ``sigmoid_norm`` for DPO; here it applies to hinge as well. IPO is always length-averaged, as in
  TRL; but TRL 1.16 reports IPO rewards from the SUMMED log-ratios, here rewards are β times the
  log-ratios the loss actually used (length-averaged whenever the loss averages).
- ORPO's odds-ratio weight is ``orpo_lambda`` and its reward scale is ``beta``; TRL's ORPO uses its
  single ``beta`` for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The loss family and its settings are defined once, with the job (pydantic, no torch); re-exported
# here because they are the loss functions' own vocabulary.
from preftune.job import LossSettings, LossType  # noqa: F401

# Length-averaged log-probs are clamped just below 0 before log(1 − p): a completion the model
# predicts with certainty would otherwise give log(0) and an infinite log-odds.
_MAX_AVG_LOGP = -1e-7
_LN2 = math.log(2.0)


@dataclass
class SeqLogps:
    """Per-sequence quantities, each (B,): summed completion log-probs and completion lengths."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


@dataclass
class LossOutput:
    """Per-example losses (B,) with grad; rewards (B,) detached."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _rewards(losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> LossOutput:
    return LossOutput(losses, (beta * chosen).detach(), (beta * rejected).detach())


def dpo_sigmoid_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """DPO, Rafailov et al. 2023 (arXiv:2305.18290) Eq. 7.

    loss = −log σ(β · ((π_c − r_c) − (π_r − r_r))); rewards β·(π − r). All inputs (B,).
    """
    chosen_ratio = policy_chosen - ref_chosen  # (B,)
    rejected_ratio = policy_rejected - ref_rejected  # (B,)
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return _rewards(losses, chosen_ratio, rejected_ratio, beta)


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """IPO, Azar et al. 2023 (arXiv:2310.12036) Eq. 17, with τ = β.

    loss = (h − 1/(2β))², h = (π_c − r_c) − (π_r − r_r). The caller passes length-AVERAGED
    log-probs (as TRL's IPO does): with sums, the fixed target margin 1/(2β) would mean something
    different for long and short answers. Rewards β·(π − r).
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    return _rewards(losses, chosen_ratio, rejected_ratio, beta)


def hinge_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """Hinge loss on the normalised likelihood: RSO, Liu et al. 2024 (arXiv:2309.06657) §3
    ("hinge-norm"); the SLiC-HF calibration loss (Zhao et al. 2023, arXiv:2305.10425, Eq. 2) with
    the margin δ = 1/β and the reference log-ratio added, as TRL's ``loss_type="hinge"``.

    loss = max(0, 1 − β · ((π_c − r_c) − (π_r − r_r))); rewards β·(π − r).
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    losses = torch.relu(1.0 - beta * (chosen_ratio - rejected_ratio))
    return _rewards(losses, chosen_ratio, rejected_ratio, beta)


def simpo_loss(
    avg_chosen: torch.Tensor,
    avg_rejected: torch.Tensor,
    *,
    beta: float,
    gamma: float,
) -> LossOutput:
    """SimPO, Meng et al. 2024 (arXiv:2405.14734) Eq. 6.

    loss = −log σ(β·π_c/|c| − β·π_r/|r| − γ), inputs already length-averaged (π/|y|). γ is the
    paper's absolute target margin, subtracted AFTER scaling by β — not γ/β (the official repo's
    ``gamma_beta_ratio`` knob); TRL's ``simpo_gamma`` means the same γ. Rewards β·π/|y|.
    """
    losses = -F.logsigmoid(beta * (avg_chosen - avg_rejected) - gamma)
    return _rewards(losses, avg_chosen, avg_rejected, beta)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, accurate at both ends (Mächler 2012, "Accurately computing log(1−exp(−|a|))").

    Each branch gets an input it is safe on, so the unused branch of ``where`` cannot put a NaN
    into the gradient.
    """
    near_zero = x > -_LN2
    a = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -_LN2))))
    b = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -_LN2), x)))
    return torch.where(near_zero, a, b)


def orpo_loss(
    avg_chosen: torch.Tensor,
    avg_rejected: torch.Tensor,
    *,
    beta: float,
    orpo_lambda: float,
) -> LossOutput:
    """ORPO, Hong et al. 2024 (arXiv:2403.07691) Eq. 6–7, with P(y|x) = exp(mean token log-prob).

    loss = NLL(chosen) − λ · log σ(log odds_c − log odds_r), where NLL(chosen) = −π_c/|c| (Eq. 2)
    and log odds = log(P / (1 − P)) = a − log(1 − eᵃ) for the average log-prob a, computed with a
    stable log(1 − eᵃ). Rewards β·π/|y| (TRL reports the same, with its β playing λ's role).
    """
    a_c = avg_chosen.clamp(max=_MAX_AVG_LOGP)
    a_r = avg_rejected.clamp(max=_MAX_AVG_LOGP)
    log_odds = (a_c - _log1mexp(a_c)) - (a_r - _log1mexp(a_r))  # (B,)
    losses = -avg_chosen - orpo_lambda * F.logsigmoid(log_odds)
    return _rewards(losses, avg_chosen, avg_rejected, beta)


def rpo_nll_term(chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """The NLL term of RPO, Pang et al. 2024 (arXiv:2404.19733) Eq. 1 (L_DPO+NLL): −log π(y_c|x)/|y_c|.

    Per-example mean token NLL of the chosen completion, (B,). The paper divides by the whole
    sequence length (prompt included); we divide by the completion length, the tokens trained on.
    As in TRL, ``rpo_alpha`` weights this term (the paper weights the DPO term instead).
    """
    return -chosen / chosen_tokens


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32)


def _check_shapes(name: str, logps: SeqLogps) -> None:
    shapes = {t.shape for t in (logps.chosen, logps.rejected, logps.chosen_tokens, logps.rejected_tokens)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"{name} log-probs must all have the same shape (B,), got {sorted(shapes)}")


def preference_loss(settings: LossSettings, policy: SeqLogps, reference: SeqLogps | None) -> LossOutput:
    """Per-example loss and detached rewards for one batch, following ``settings``.

    ``reference`` is required when ``settings.needs_reference``; it is ignored otherwise (SimPO,
    ORPO, reference-free — the last treats every reference log-prob as 0).
    """
    _check_shapes("policy", policy)
    loss_type = settings.loss_type
    # An empty completion (never produced by the collator, which keeps EOS) must not divide by 0.
    len_c = _as_float(policy.chosen_tokens).clamp(min=1.0)
    len_r = _as_float(policy.rejected_tokens).clamp(min=1.0)
    pc, pr = _as_float(policy.chosen), _as_float(policy.rejected)

    if loss_type is LossType.SIMPO:
        out = simpo_loss(pc / len_c, pr / len_r, beta=settings.beta, gamma=settings.simpo_gamma)
    elif loss_type is LossType.ORPO:
        out = orpo_loss(pc / len_c, pr / len_r, beta=settings.beta, orpo_lambda=settings.orpo_lambda)
    else:
        if settings.reference_free:
            rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
        elif reference is None:
            raise ValueError(f"loss_type {loss_type.value!r} needs reference log-probs (or reference_free)")
        else:
            _check_shapes("reference", reference)
            if reference.chosen.shape != policy.chosen.shape:
                raise ValueError(
                    f"reference batch {tuple(reference.chosen.shape)} does not match policy "
                    f"batch {tuple(policy.chosen.shape)}"
                )
            rc, rr = _as_float(reference.chosen), _as_float(reference.rejected)
        if settings.normalize_by_length or loss_type is LossType.IPO:
            # (π − r)/|y| = π/|y| − r/|y|: dividing each log-prob divides the log-ratio.
            pc, pr, rc, rr = pc / len_c, pr / len_r, rc / len_c, rr / len_r
        fn = {LossType.DPO: dpo_sigmoid_loss, LossType.IPO: ipo_loss, LossType.HINGE: hinge_loss}[loss_type]
        out = fn(pc, pr, rc, rr, beta=settings.beta)

    if settings.rpo_alpha > 0:
        nll = rpo_nll_term(_as_float(policy.chosen), len_c)
        out = LossOutput(out.losses + settings.rpo_alpha * nll, out.chosen_rewards, out.rejected_rewards)
    return out
