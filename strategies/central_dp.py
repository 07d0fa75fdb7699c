"""A strategy under central DP at the coordinator (DP-FedAvg with fixed clipping,
McMahan et al. 2018), as a wrapper around any linear strategy.

Each site's change from what it was sent is clipped to `privacy.central_clip_norm`
(over all the tensors it trains together), every site weighs the same, and the
wrapped strategy's aggregate gets Gaussian noise of std
`central_noise_multiplier * clip_norm / n` on the trained tensors, as Flower's
DifferentialPrivacyServerSideFixedClipping does. The privacy unit is a whole site;
every round is one Gaussian mechanism at sampling rate = sites asked / sites there
were to ask, accounted over rounds (privacy/accounting.py). The math is in
privacy/central_dp.py.
"""

from __future__ import annotations

from fedlora.adapter_state import Adapter
from fedlora.config import PrivacySection
from fedlora.privacy.accounting import epsilon_of
from fedlora.privacy.central_dp import add_noise, clip_update
from fedlora.strategies.base import ClientUpdate, Strategy


class CentralDP:
    """`strategy` with clipped, unweighted updates and a noisy aggregate; `history`
    holds one (noise multiplier, sampling rate, steps) entry per aggregated round."""

    def __init__(self, strategy: Strategy, privacy: PrivacySection, history: list[tuple[float, float, int]] | None = None):
        self.strategy = strategy
        self.privacy = privacy
        self.history = list(history or [])
        self._metrics: dict[str, float] = {}

    def aggregate(self, global_adapter: Adapter, updates: list[ClientUpdate], sampling_rate: float) -> Adapter:
        privacy = self.privacy
        clipped = [ClientUpdate(u.node_id, clip_update(u.adapter, u.start(global_adapter), privacy.central_clip_norm), 1, u.sent)
                   for u in updates]
        std = privacy.central_noise_multiplier * privacy.central_clip_norm / len(clipped)
        noisy = add_noise(self.strategy.aggregate(global_adapter, clipped), sorted(clipped[0].adapter), std)
        self.history.append((privacy.central_noise_multiplier, min(1.0, sampling_rate), 1))
        self._metrics = {"central_noise_std": std,
                         "central_epsilon": epsilon_of(self.history, privacy.delta, privacy.accountant)}
        return noisy

    def round_metrics(self) -> dict[str, float]:
        return self._metrics
