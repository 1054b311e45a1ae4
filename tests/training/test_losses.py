"""The preference losses against hand-worked values, plus the properties the loop relies on.

Notation in the docstrings: πc, πr = policy summed log-probs of chosen / rejected; rc, rr = the
reference's; |c|, |r| = completion token counts; softplus(z) = log(1 + eᶻ) = −log σ(−z).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from preftune.tasks.training.losses import (
    LossOutput,
    LossSettings,
    LossType,
    SeqLogps,
    dpo_sigmoid_loss,
    orpo_loss,
    preference_loss,
    rpo_nll_term,
)

TIGHT = {"atol": 1e-6, "rtol": 1e-6}


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def seq(chosen, rejected, chosen_tokens=None, rejected_tokens=None) -> SeqLogps:
    chosen, rejected = t(*chosen), t(*rejected)
    ones = torch.ones_like(chosen, dtype=torch.long)
    return SeqLogps(
        chosen=chosen,
        rejected=rejected,
        chosen_tokens=ones if chosen_tokens is None else torch.tensor(chosen_tokens),
        rejected_tokens=ones if rejected_tokens is None else torch.tensor(rejected_tokens),
    )


def check(out: LossOutput, losses, chosen_rewards, rejected_rewards) -> None:
    assert_close(out.losses, t(*losses), **TIGHT)
    assert_close(out.chosen_rewards, t(*chosen_rewards), **TIGHT)
    assert_close(out.rejected_rewards, t(*rejected_rewards), **TIGHT)


# Shared DPO-style batch: chosen log-ratio [1, 1, 0], rejected log-ratio [-1, 1, 2],
# margin h = [2, 0, -2].
POLICY = ((-10.0, -5.0, -8.0), (-12.0, -5.0, -6.0))
REFERENCE = ((-11.0, -6.0, -8.0), (-11.0, -6.0, -8.0))


def test_dpo_sigmoid_hand_worked():
    """β = 0.5, so β·h = [1, 0, −1]; loss = −log σ(β·h) = softplus(−β·h):
    [log(1 + e⁻¹), log 2, log(1 + e)] = [0.3132616875, 0.6931471806, 1.3132616875].
    Rewards β·(π − r): chosen [0.5, 0.5, 0], rejected [−0.5, 0.5, 1]."""
    out = preference_loss(LossSettings(beta=0.5), seq(*POLICY), seq(*REFERENCE))
    check(out, [0.3132616875, 0.6931471806, 1.3132616875], [0.5, 0.5, 0.0], [-0.5, 0.5, 1.0])
    # The pure function gives the same thing from the raw log-probs.
    direct = dpo_sigmoid_loss(t(*POLICY[0]), t(*POLICY[1]), t(*REFERENCE[0]), t(*REFERENCE[1]), beta=0.5)
    assert_close(direct.losses, out.losses, **TIGHT)


def test_ipo_hand_worked_is_length_averaged():
    """β = 0.25, target margin 1/(2β) = 2. |c| = [2, 4], |r| = [1, 2].
    Averaged chosen log-ratio (πc − rc)/|c| = [(−4+8)/2, (−8+8)/4] = [2, 0];
    averaged rejected log-ratio (πr − rr)/|r| = [(−3+2)/1, (−2+4)/2] = [−1, 1];
    h = [3, −1]; loss = (h − 2)² = [1, 9]. Rewards β·averaged ratio: [0.5, 0], [−0.25, 0.25]."""
    policy = seq((-4.0, -8.0), (-3.0, -2.0), [2, 4], [1, 2])
    reference = seq((-8.0, -8.0), (-2.0, -4.0), [2, 4], [1, 2])
    out = preference_loss(LossSettings(loss_type=LossType.IPO, beta=0.25), policy, reference)
    check(out, [1.0, 9.0], [0.5, 0.0], [-0.25, 0.25])
    # normalize_by_length is already implied for IPO: asking for it changes nothing.
    again = preference_loss(LossSettings(loss_type="ipo", beta=0.25, normalize_by_length=True), policy, reference)
    assert_close(again.losses, out.losses, **TIGHT)


def test_hinge_hand_worked():
    """β = 0.25; margins h = [2, −2, 8] (reference zero): 1 − β·h = [0.5, 1.5, −1];
    relu → [0.5, 1.5, 0]. Rewards β·π: chosen [0, −0.5, 0.5], rejected [−0.5, 0, −1.5]."""
    policy = seq((0.0, -2.0, 2.0), (-2.0, 0.0, -6.0))
    reference = seq((0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    out = preference_loss(LossSettings(loss_type=LossType.HINGE, beta=0.25), policy, reference)
    check(out, [0.5, 1.5, 0.0], [0.0, -0.5, 0.5], [-0.5, 0.0, -1.5])


def test_dpo_normalize_by_length_hand_worked():
    """β = 1. Chosen: (πc − rc)/|c| = (−6 + 10)/2 = 2; rejected: (πr − rr)/|r| = (−9 + 6)/3 = −1.
    h = 3, loss = softplus(−3) = log(1 + e⁻³) = 0.0485873516. Rewards [2], [−1]."""
    policy = seq((-6.0,), (-9.0,), [2], [3])
    reference = seq((-10.0,), (-6.0,), [2], [3])
    out = preference_loss(LossSettings(beta=1.0, normalize_by_length=True), policy, reference)
    check(out, [0.0485873516], [2.0], [-1.0])


def test_rpo_alpha_adds_per_token_nll_of_chosen():
    """Row 1 of the shared DPO batch (β = 0.5, loss log(1 + e⁻¹) = 0.3132616875) with |c| = 4:
    NLL = −πc/|c| = 10/4 = 2.5; with rpo_alpha = 0.5 the loss is 0.3132616875 + 1.25 = 1.5632616875.
    Rewards are the DPO rewards, unchanged: [0.5], [−0.5]."""
    policy = seq((-10.0,), (-12.0,), [4], [7])
    reference = seq((-11.0,), (-11.0,), [4], [7])
    out = preference_loss(LossSettings(beta=0.5, rpo_alpha=0.5), policy, reference)
    check(out, [1.5632616875], [0.5], [-0.5])
    assert_close(rpo_nll_term(t(-10.0, -3.0), t(4.0, 2.0)), t(2.5, 1.5), **TIGHT)


def test_simpo_hand_worked_gamma_is_subtracted_after_beta():
    """β = 2, γ = 0.5 (the paper's γ, Eq. 6: −log σ(β·Δ − γ), NOT β·(Δ − γ)).
    Averages: chosen πc/|c| = [−2/4, −3/3] = [−0.5, −1]; rejected πr/|r| = [−6/3, −5/4] = [−2, −1.25].
    Δ = [1.5, 0.25]; β·Δ − γ = [2.5, 0]; loss = [log(1 + e⁻²·⁵), log 2] = [0.0788897343, 0.6931471806].
    Rewards β·average: chosen [−1, −2], rejected [−4, −2.5]."""
    policy = seq((-2.0, -3.0), (-6.0, -5.0), [4, 3], [3, 4])
    out = preference_loss(LossSettings(loss_type=LossType.SIMPO, beta=2.0, simpo_gamma=0.5), policy, None)
    check(out, [0.0788897343, 0.6931471806], [-1.0, -2.0], [-4.0, -2.5])


def test_orpo_hand_worked():
    """λ = 0.5, β = 0.1. P = exp(average log-prob); odds = P/(1 − P).
    Row 1: P_c = 1/2 (πc = 3·(−ln 2), |c| = 3) → odds 1; P_r = 1/5 (πr = 2·(−ln 5), |r| = 2) → odds 1/4.
      log odds ratio = ln 4, σ(ln 4) = 4/5; NLL = ln 2; loss = ln 2 − 0.5·ln 0.8 = 0.8047189562.
    Row 2: P_c = 3/4 → odds 3; P_r = 1/4 → odds 1/3; ratio 9, σ(ln 9) = 9/10;
      NLL = ln(4/3); loss = ln(4/3) − 0.5·ln 0.9 = 0.3403623303.
    Rewards β·average log-prob: chosen [−0.1·ln 2, 0.1·ln 0.75], rejected [−0.1·ln 5, 0.1·ln 0.25]."""
    policy = seq(
        (3 * math.log(0.5), 2 * math.log(0.75)),
        (2 * math.log(0.2), 5 * math.log(0.25)),
        [3, 2],
        [2, 5],
    )
    out = preference_loss(LossSettings(loss_type=LossType.ORPO, beta=0.1, orpo_lambda=0.5), policy, None)
    check(
        out,
        [0.8047189562, 0.3403623303],
        [0.1 * math.log(0.5), 0.1 * math.log(0.75)],
        [0.1 * math.log(0.2), 0.1 * math.log(0.25)],
    )


def test_orpo_is_stable_near_certainty_and_far_from_it():
    """Average log-probs a_c = −1e−5, a_r = −3e−5 (P ≈ 0.99999, 0.99997), λ = 1.
    log odds = a − log(1 − eᵃ): 11.5129204650 and 10.4142982... (float64), ratio z = 1.0986222887
    (≈ ln 3); loss = 1e−5 + log(1 + e⁻ᶻ) = 0.2876895725. A naive float32 log1p(−exp(a)) gives
    z = 1.0966 and a loss of 0.28818, off by 5e−4. Averages of exactly 0 and of −200 must still
    give finite losses and gradients."""
    chosen = torch.tensor([-1e-5, 0.0, -200.0], requires_grad=True)
    rejected = torch.tensor([-3e-5, -200.0, 0.0], requires_grad=True)
    out = orpo_loss(chosen, rejected, beta=0.1, orpo_lambda=1.0)
    assert_close(out.losses[0], torch.tensor(0.2876895725), **TIGHT)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


def test_reference_free_equals_zero_reference():
    """reference_free treats every reference log-prob as 0 and needs no reference at all."""
    settings = LossSettings(beta=0.5, reference_free=True)
    assert not settings.needs_reference
    free = preference_loss(settings, seq(*POLICY), None)
    zeros = preference_loss(LossSettings(beta=0.5), seq(*POLICY), seq((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)))
    assert_close(free.losses, zeros.losses, **TIGHT)
    assert_close(free.chosen_rewards, zeros.chosen_rewards, **TIGHT)
    # Hand value for row 1: h = −10 − (−12) = 2, β·h = 1 → log(1 + e⁻¹).
    assert_close(free.losses[0], torch.tensor(0.3132616875), **TIGHT)


@pytest.mark.parametrize("loss_type", [LossType.DPO, LossType.HINGE])
def test_normalize_by_length_with_equal_lengths_is_plain_on_divided_logps(loss_type):
    """With every length L = 4, normalising equals the plain loss on log-probs divided by 4."""
    tokens = [4, 4, 4]
    normalized = preference_loss(
        LossSettings(loss_type=loss_type, beta=0.5, normalize_by_length=True),
        seq(*POLICY, tokens, tokens),
        seq(*REFERENCE, tokens, tokens),
    )
    divided = [tuple(v / 4 for v in side) for side in POLICY], [tuple(v / 4 for v in side) for side in REFERENCE]
    plain = preference_loss(LossSettings(loss_type=loss_type, beta=0.5), seq(*divided[0]), seq(*divided[1]))
    assert_close(normalized.losses, plain.losses, **TIGHT)
    assert_close(normalized.chosen_rewards, plain.chosen_rewards, **TIGHT)
    assert_close(normalized.rejected_rewards, plain.rejected_rewards, **TIGHT)


def test_dpo_beta_to_zero_tends_to_log_two():
    """σ(β·h) → σ(0) = 1/2 as β → 0, so the loss → log 2 whatever the margin; rewards → 0."""
    out = preference_loss(LossSettings(beta=1e-9), seq(*POLICY), seq(*REFERENCE))
    assert_close(out.losses, torch.full((3,), math.log(2.0)), **TIGHT)
    assert_close(out.chosen_rewards, torch.zeros(3), **TIGHT)


SIGN_CASES = [
    LossSettings(loss_type=LossType.DPO, beta=0.5),
    LossSettings(loss_type=LossType.DPO, beta=0.5, normalize_by_length=True, rpo_alpha=1.0),
    LossSettings(loss_type=LossType.IPO, beta=0.1),  # target margin 5, far above the batch's
    LossSettings(loss_type=LossType.HINGE, beta=0.1),  # 1 − β·h > 0 for every row
    LossSettings(loss_type=LossType.SIMPO, beta=2.0, simpo_gamma=0.5),
    LossSettings(loss_type=LossType.ORPO, beta=0.1, orpo_lambda=0.5),
]


@pytest.mark.parametrize("settings", SIGN_CASES, ids=lambda s: f"{s.loss_type.value}")
def test_gradient_signs(settings):
    """Raising the policy's chosen log-prob lowers every loss; raising the rejected one raises it."""
    policy = seq(*POLICY, [2, 3, 4], [3, 2, 5])
    policy.chosen.requires_grad_(True)
    policy.rejected.requires_grad_(True)
    out = preference_loss(settings, policy, seq(*REFERENCE, [2, 3, 4], [3, 2, 5]))
    out.losses.sum().backward()
    assert (policy.chosen.grad < 0).all(), policy.chosen.grad
    assert (policy.rejected.grad > 0).all(), policy.rejected.grad


@pytest.mark.parametrize("loss_type", list(LossType))
def test_rewards_are_detached_and_losses_are_per_example(loss_type):
    policy = seq(*POLICY, [2, 3, 4], [3, 2, 5])
    policy.chosen.requires_grad_(True)
    out = preference_loss(LossSettings(loss_type=loss_type), policy, seq(*REFERENCE, [2, 3, 4], [3, 2, 5]))
    assert out.losses.shape == (3,) and out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert out.chosen_rewards.grad_fn is None and out.rejected_rewards.grad_fn is None


def test_bf16_inputs_are_computed_in_float32():
    """bf16 log-probs (exact small integers here) give the float32 hand value of row 1, log(1 + e⁻¹)."""

    def bf16(side):
        return SeqLogps(t(*side[0]).bfloat16(), t(*side[1]).bfloat16(), torch.ones(3, dtype=torch.long), torch.ones(3))

    out = preference_loss(LossSettings(beta=0.5), bf16(POLICY), bf16(REFERENCE))
    assert out.losses.dtype == torch.float32
    assert_close(out.losses[0], torch.tensor(0.3132616875), **TIGHT)


def test_enum_properties():
    assert {t.value for t in LossType} == {"dpo", "ipo", "hinge", "simpo", "orpo"}
    assert [t.needs_reference for t in LossType] == [True, True, True, False, False]
    assert [t.length_normalized for t in LossType] == [False, False, False, True, True]
    assert LossType("simpo") is LossType.SIMPO and LossType.DPO == "dpo"
    assert LossSettings(loss_type=LossType.IPO).needs_reference
    assert not LossSettings(loss_type=LossType.IPO, reference_free=True).needs_reference
    assert not LossSettings(loss_type=LossType.ORPO).needs_reference
    assert LossSettings(loss_type="hinge").loss_type is LossType.HINGE


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_type": "simpo", "rpo_alpha": 0.5, "simpo_gamma": 0.5}, "rpo_alpha .* and simpo_gamma .* cannot both"),
        ({"rpo_alpha": 1.0, "simpo_gamma": 0.2}, "cannot both be positive"),
        ({"beta": 0.0}, r"beta\n  Input should be greater than 0"),
        ({"beta": -0.1}, r"beta\n  Input should be greater than 0"),
        ({"beta": float("nan")}, r"beta\n  Input should be a finite number"),
        ({"rpo_alpha": -1.0}, r"rpo_alpha\n  Input should be greater than or equal to 0"),
        ({"loss_type": "simpo", "simpo_gamma": -0.5}, r"simpo_gamma\n  Input should be greater than or equal to 0"),
        ({"orpo_lambda": -0.1}, r"orpo_lambda\n  Input should be greater than or equal to 0"),
        ({"simpo_gamma": 0.5}, "simpo_gamma only applies to loss_type 'simpo'"),
        ({"loss_type": "orpo", "rpo_alpha": 0.5}, "ORPO already includes an NLL term"),
        ({"loss_type": "kto"}, r"loss_type\n  Input should be 'dpo', 'ipo', 'hinge', 'simpo' or 'orpo'"),
    ],
)
def test_settings_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossSettings(**kwargs)


def test_missing_or_mismatched_reference_is_an_error():
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss(LossSettings(loss_type=LossType.HINGE), seq(*POLICY), None)
    with pytest.raises(ValueError, match="does not match policy batch"):
        preference_loss(LossSettings(), seq(*POLICY), seq((-1.0,), (-1.0,)))
    bad = SeqLogps(t(-1.0, -2.0), t(-1.0), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="same shape"):
        preference_loss(LossSettings(loss_type=LossType.SIMPO), bad, None)


def test_losses_on_a_real_collated_batch(zoo):
    """Production shapes: real pairs → the trainer's tokenizer path and collator → a zoo model's
    summed log-probs → preference_loss. With the policy as its own reference every log-ratio is 0,
    so DPO gives exactly log 2 per pair and zero rewards; every loss back-propagates finite grads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from preftune.tasks.training.data import collate, tokenize_pairs
    from preftune.tasks.training.logps import SequenceLogps
    from preftune.tasks.training.loop import seq_logps

    torch.manual_seed(0)
    model_dir = zoo["models"]["tiny-llama"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    records = [
        {"input": {"messages": [{"role": "user", "content": q}]},
         "preferred_output": [{"role": "assistant", "content": good}],
         "non_preferred_output": [{"role": "assistant", "content": bad}]}
        for q, good, bad in [
            ("What is the capital of France?", "Paris is the capital of France.", "Berlin."),
            ("Name a primary colour.", "Red.", "Purple is a primary colour, I think."),
            ("How many legs has a spider?", "A spider has eight legs.", "Six."),
        ]
    ]
    pairs = tokenize_pairs(records, tokenizer, max_length=64)
    batch = collate(pairs, [0, 1, 2], tokenizer.eos_token_id)
    module = SequenceLogps(lm)
    policy = seq_logps(module, batch, "cpu")
    with torch.no_grad():
        reference = seq_logps(module, batch, "cpu")

    assert policy.chosen.shape == (3,) and policy.chosen_tokens.dtype == torch.long
    assert policy.chosen_tokens.tolist() == [len(p.chosen) for p in pairs]
    assert policy.rejected_tokens.tolist() == [len(p.rejected) for p in pairs]
    dpo = preference_loss(LossSettings(beta=0.1), policy, reference)
    assert_close(dpo.losses, torch.full((3,), math.log(2.0)), **TIGHT)
    assert_close(dpo.chosen_rewards, torch.zeros(3), **TIGHT)

    total = dpo.losses.sum()
    for settings in (LossSettings(loss_type=LossType.IPO), LossSettings(rpo_alpha=1.0),
                     LossSettings(loss_type=LossType.SIMPO, simpo_gamma=0.5), LossSettings(loss_type=LossType.ORPO)):
        out = preference_loss(settings, policy, reference)
        assert out.losses.shape == (3,) and torch.isfinite(out.losses).all()
        total = total + out.losses.sum()
    total.backward()
    grads = [p.grad for p in lm.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
