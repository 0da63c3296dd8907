"""The eval runner's policy agent with the policy behind a server (`vla-scale eval --server ws://...`).

It makes exactly the queries the in-process `PolicyAgent` makes (same frames, same reset seed per episode,
same execution of the chunks: `ChunkingAgent`), so a served policy acts identically to the same export loaded
in-process. Each eval worker holds its own connection, so its episodes have their own state on the server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from vla_scale.eval.agents import ChunkingAgent, Execution
from vla_scale.serve.client import PolicyClient

if TYPE_CHECKING:
    from vla_scale.eval.env import Env, EnvObservation


class ServerPolicyAgent(ChunkingAgent):
    """A policy served by `vla-scale serve`."""

    def __init__(self, url: str, execution: Execution | None = None, timeout: float = 300.0) -> None:
        self.client = PolicyClient(url, timeout=timeout)
        meta = self.client.metadata
        self._static, self._wrist = meta["static_camera"], meta["wrist_camera"]
        try:
            self._setup(
                execution or Execution(),
                query_every_step=int(meta["window_size"]) > 1 or bool(meta["stepwise"]),
                can_inpaint=bool(meta.get("inpainting")),
            )
        except ValueError:
            self.client.close()
            raise

    def reset(self, env: Env, seed: int) -> None:
        meta = self.client.metadata
        state_dim, action_dim = meta["state"]["dim"], meta["action"]["dim"]
        if env.state_dim != state_dim or env.action_space.dim != action_dim:
            raise ValueError(
                f"the served policy was trained on state dim {state_dim} / action dim {action_dim}; "
                f"suite {env.suite} has {env.state_dim} / {env.action_space.dim}"
            )
        self.client.reset(seed)
        self._start_episode()

    def _query(self, obs: EnvObservation, prefix: np.ndarray | None = None, prefix_delay: int = 0) -> np.ndarray:
        images = {self._static: obs.image}
        if self._wrist:
            if obs.wrist_image is None:
                raise ValueError(f"the served policy needs a wrist camera ({self._wrist}); this env renders none")
            images[self._wrist] = obs.wrist_image
        request = {"images": images, "state": obs.state, "instruction": obs.instruction}
        return self.client.infer(request, prefix=prefix, prefix_delay=prefix_delay)

    def close(self) -> None:
        super().close()
        self.client.close()
