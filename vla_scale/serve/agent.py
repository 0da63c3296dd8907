"""The eval runner's policy agent with the policy behind a server (`vla-scale eval --server ws://...`).

It makes exactly the queries the in-process `PolicyAgent` makes (same frames, same reset seed per episode,
same replanning through `ChunkExecutor`), so a served policy acts identically to the same export loaded
in-process. Each eval worker holds its own connection, so its episodes have their own state on the server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vla_scale.eval.agents import Agent, ChunkExecutor
from vla_scale.serve.client import PolicyClient

if TYPE_CHECKING:
    from vla_scale.eval.env import Env, EnvObservation


class ServerPolicyAgent(Agent):
    """A policy served by `vla-scale serve`, run through a `ChunkExecutor`."""

    name = "policy"

    def __init__(
        self, url: str, exec_steps: int = 1, ensemble: bool = False, ensemble_k: float = 0.01, timeout: float = 300.0
    ) -> None:
        self.client = PolicyClient(url, timeout=timeout)
        meta = self.client.metadata
        self.executor = ChunkExecutor(exec_steps, ensemble, ensemble_k)
        self._query_every_step = int(meta["window_size"]) > 1 or bool(meta["stepwise"])
        self._static, self._wrist = meta["static_camera"], meta["wrist_camera"]

    def reset(self, env: Env, seed: int) -> None:
        meta = self.client.metadata
        state_dim, action_dim = meta["state"]["dim"], meta["action"]["dim"]
        if env.state_dim != state_dim or env.action_space.dim != action_dim:
            raise ValueError(
                f"the served policy was trained on state dim {state_dim} / action dim {action_dim}; "
                f"suite {env.suite} has {env.state_dim} / {env.action_space.dim}"
            )
        self.client.reset(seed)
        self.executor.reset()

    def act(self, obs: EnvObservation) -> np.ndarray:
        due = self.executor.due()
        if due or self._query_every_step:
            images = {self._static: obs.image}
            if self._wrist:
                if obs.wrist_image is None:
                    raise ValueError(f"the served policy needs a wrist camera ({self._wrist}); this env renders none")
                images[self._wrist] = obs.wrist_image
            chunk = self.client.infer({"images": images, "state": obs.state, "instruction": obs.instruction})
            if due:
                self.executor.push(chunk)
        return self.executor.pop()

    def close(self) -> None:
        self.client.close()
