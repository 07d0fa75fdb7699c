"""Server optimizers (FedOpt): the server treats this round's change as a gradient.

Reddi et al. 2021, "Adaptive Federated Optimization" (Algorithm 2): with x the
global adapter and the clients' num-examples-weighted mean adapter,

    delta = weighted_mean(client adapters) - x        (the pseudo-gradient, per tensor)
    x    <- x + server_lr * direction(delta)

where each subclass's `direction` updates its moment buffers (per adapter key) and
returns the step direction. This class owns the pseudo-gradient, the buffers and
their (de)serialisation; fedavgm.py, fedadam.py and fedyogi.py hold only the rules.
All arithmetic and the buffers are float64; the new adapter is cast to float32.

State (flat, for safetensors): ``"step"`` (0-d int64: rounds aggregated so far) and
``"<buffer>/<adapter key>"`` for each buffer, e.g. ``"m/...lora_A.weight"``.
"""

from __future__ import annotations

import torch

from fedlora.adapter_state import Adapter
from fedlora.config import StrategySection
from fedlora.strategies.base import ClientUpdate, StrategyDefaults
from fedlora.strategies.fedavg import weighted_mean64


class ServerOptimizer(StrategyDefaults):
    name: str
    buffers: tuple[str, ...]  # moment buffer names, e.g. ("m", "v")
    default_server_lr: float  # used when strategy.server_lr is 0

    def __init__(self, section: StrategySection):
        self.section = section
        self.step = 0
        self.moments: dict[str, Adapter] = {b: {} for b in self.buffers}

    def initial(self, buffer: str) -> float:
        """A buffer's value (in every coordinate) before the first round."""
        return 0.0

    def direction(self, delta: Adapter) -> Adapter:
        """Update self.moments from the pseudo-gradient; return the step direction."""
        raise NotImplementedError

    def aggregate(self, global_adapter: Adapter, updates: list[ClientUpdate]) -> Adapter:
        mean = weighted_mean64(updates)
        current = {key: global_adapter[key].to(torch.float64) for key in mean}
        delta = {key: mean[key] - current[key] for key in mean}
        for buffer, values in self.moments.items():
            for key, d in delta.items():
                if key not in values:
                    values[key] = torch.full_like(d, self.initial(buffer))
        step = self.direction(delta)
        self.step += 1
        lr = self.section.server_lr or self.default_server_lr
        return {key: (current[key] + lr * step[key]).to(torch.float32) for key in mean}

    def state(self) -> dict[str, torch.Tensor]:
        out = {"step": torch.tensor(self.step, dtype=torch.int64)}
        for buffer, values in self.moments.items():
            out.update({f"{buffer}/{key}": value.clone().contiguous() for key, value in values.items()})
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        moments: dict[str, Adapter] = {b: {} for b in self.buffers}
        for name, value in state.items():
            if name == "step":
                continue
            buffer, sep, key = name.partition("/")
            if not sep or buffer not in moments:
                raise ValueError(f"strategy {self.name!r}: unexpected state entry {name!r} (buffers: {', '.join(self.buffers)})")
            moments[buffer][key] = value.to(torch.float64).clone()
        if "step" not in state:
            raise ValueError(f"strategy {self.name!r}: state has no 'step'")
        if len({frozenset(v) for v in moments.values()}) > 1:
            raise ValueError(f"strategy {self.name!r}: state buffers {', '.join(self.buffers)} cover different adapter keys")
        self.step = int(state["step"].item())
        self.moments = moments
