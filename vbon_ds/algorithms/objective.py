"""The objective of the on-policy algorithms (vbon.objective), in one place: what each answer is credited
with, the KL coefficient beta and the label runs carry in evaluation reports.

    vbon        reward log F_hat(r) (the paper's bound), beta = 1/(N-1)
    vbon_exact  the tie-aware exact log(pi_BoN / pi_ref) / (N-1), beta = 1/(N-1)
    kl_rl       the raw reward r, beta = vbon.beta (the KL-constrained RL baseline)

The reward transforms themselves are in core/bon.py (docs/math.md).
"""

from __future__ import annotations

from typing import Any

import torch

from vbon_ds.config import ExperimentConfig
from vbon_ds.core import bon

_ESTIMATORS = {"vbon": "bound", "vbon_exact": "exact"}
"""The vBoN objectives and the core/bon.py estimator each uses; kl_rl, the other objective, uses none."""


def is_vbon(objective: str) -> bool:
    """Whether `objective` is a vBoN objective (credits a reward from the cached reference rewards)."""
    return objective in _ESTIMATORS


def needs_reference_rewards(cfg: ExperimentConfig) -> bool:
    """Whether on-policy training needs the reference cache: the vBoN rewards are computed from it
    (kl_rl logs train/log_F from it only when it exists)."""
    return is_vbon(cfg.vbon.objective)


def objective_beta(cfg: ExperimentConfig) -> float:
    """The KL coefficient: vbon.beta when set, else 1/(N-1) for the vBoN objectives."""
    if cfg.vbon.beta is not None:
        return cfg.vbon.beta
    return bon.vbon_beta(cfg.vbon.n)


def objective_reward(
    cfg: ExperimentConfig,
    rewards: torch.Tensor,
    sorted_ref_rewards: torch.Tensor | None,
    ended_with_eos: torch.Tensor,
) -> torch.Tensor:
    """The scalar each answer is credited with: raw r (kl_rl, reward.missing_eos_score already in it) or a
    vBoN reward from the cached rewards (with missing_eos_score set, cut-off answers get the lowest one)."""
    if not is_vbon(cfg.vbon.objective):
        return rewards
    return bon.vbon_reward(
        rewards,
        sorted_ref_rewards,
        cfg.vbon.n,
        _ESTIMATORS[cfg.vbon.objective],
        ended_with_eos=_cut_off(cfg, ended_with_eos),
        presorted=True,
    )


def log_f(
    cfg: ExperimentConfig,
    rewards: torch.Tensor,
    sorted_ref_rewards: torch.Tensor | None,
    ended_with_eos: torch.Tensor,
    objective_rewards: torch.Tensor,
) -> torch.Tensor | None:
    """log F_hat(r) of each answer against the cached rewards (None without a cache); for vbon it is the
    objective reward itself, so it is not computed twice."""
    if sorted_ref_rewards is None:
        return None
    if _ESTIMATORS.get(cfg.vbon.objective) == "bound":
        return objective_rewards
    return bon.log_cdf_of_answers(rewards, sorted_ref_rewards, _cut_off(cfg, ended_with_eos), presorted=True)


def _cut_off(cfg: ExperimentConfig, ended_with_eos: torch.Tensor) -> torch.Tensor | None:
    # Only with reward.missing_eos_score set do answers cut off before EOS get the lowest vBoN reward.
    return ended_with_eos if cfg.reward.missing_eos_score is not None else None


def objective_label(vbon: dict[str, Any], algo_name: str) -> str:
    """A run's label from its saved config's vbon section, e.g. 'vBoN (bound) N=8 (rloo)',
    'KL-RL beta=0.05 (ppo)'."""
    estimator = _ESTIMATORS.get(vbon["objective"])
    if estimator is None:
        return f"KL-RL beta={vbon['beta']:g} ({algo_name})"
    return f"vBoN ({estimator}) N={vbon['n']} ({algo_name})"
