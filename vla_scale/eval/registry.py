"""Suite name -> environment factory, an explicit table.

Factories import their simulator only when called, so listing suites or importing
`vla_scale.eval` never needs MuJoCo or Meta-World installed.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence

from vla_scale.eval.env import Env


def _instruct(image_size: int, camera: str | None, wrist: bool, tasks: Sequence[str] | None) -> Env:
    from vla_scale.eval.instruct import InstructEnv

    env = InstructEnv(image_size=image_size, camera=camera, wrist=wrist)
    if tasks is not None:
        for t in tasks:
            env.check_task(t)
        env.tasks = tuple(tasks)
    return env


def _metaworld(image_size: int, camera: str | None, wrist: bool, tasks: Sequence[str] | None) -> Env:
    from vla_scale.eval.metaworld_suite import DEFAULT_TASKS, MetaWorldEnv

    return MetaWorldEnv(tasks=tasks or DEFAULT_TASKS, image_size=image_size, camera=camera, wrist=wrist)


def _metaworld_mt10(image_size: int, camera: str | None, wrist: bool, tasks: Sequence[str] | None) -> Env:
    from vla_scale.eval.metaworld_suite import MT10_TASKS, MetaWorldEnv

    env = MetaWorldEnv(tasks=tasks or MT10_TASKS, image_size=image_size, camera=camera, wrist=wrist)
    env.suite = "metaworld_mt10"
    return env


Factory = Callable[[int, "str | None", bool, "Sequence[str] | None"], Env]

SUITES: dict[str, Factory] = {
    "instruct": _instruct,
    "metaworld": _metaworld,
    "metaworld_mt10": _metaworld_mt10,
}


def make_env(
    suite: str,
    image_size: int = 64,
    camera: str | None = None,
    wrist: bool = False,
    tasks: Sequence[str] | None = None,
) -> Env:
    """Build the environment of `suite` rendering `image_size`-px square frames.

    `camera` overrides the suite's static camera, `wrist` adds a wrist camera frame, and
    `tasks` restricts (or, for Meta-World, chooses) the suite's tasks.
    """
    factory = SUITES.get(suite)
    if factory is None:
        close = difflib.get_close_matches(suite, SUITES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown simulator suite {suite!r}{hint} Known suites: {', '.join(SUITES)}")
    return factory(image_size, camera, wrist, tasks)
