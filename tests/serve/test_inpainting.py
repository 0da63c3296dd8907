"""Real-time chunking through the server: a flow export inpaints its chunk to continue a prefix (same answer as
in-process `Policy.predict`), bad prefixes get error replies, policies that cannot inpaint say so, and the
asynchronous executor sends what the current chunk still holds with the ticks the last reply took."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.serve.conftest import CHUNK, make_obs, predict_local
from vla_scale.policy import Policy
from vla_scale.serve import AsyncChunkExecutor, PolicyClient, ServerError
from vla_scale.serve.server import load_server


@pytest.fixture(scope="module")
def flow_server(flow_export_dir, one_thread):
    with load_server(flow_export_dir, port=0) as srv:
        yield srv


def test_served_inpainting_equals_in_process_and_follows_the_prefix(flow_server, flow_export_dir):
    local = Policy.from_pretrained(flow_export_dir, device="cpu")
    obs = make_obs(np.random.default_rng(0))
    with PolicyClient(flow_server.url, timeout=60) as client:
        assert client.metadata["inpainting"]
        plain = client.infer(obs, seed=5)
        prefix = plain[:5] + 0.5  # a previous chunk that disagrees with this one's own answer
        client.reset()
        guided = client.infer(obs, seed=5, prefix=prefix, prefix_delay=3)
    local.reset()
    image, instruction, state = obs["images"]["rgb_static"], obs["instruction"], obs["state"]
    want = local.predict(image, instruction, state, 5, prefix=prefix, prefix_delay=3)
    np.testing.assert_array_equal(guided, want)
    regressed = slice(0, 3)  # the toy robot's gripper (dim 3) is binary: compare the regressed dims
    held = lambda chunk: np.abs(chunk[:3, regressed] - prefix[:3, regressed]).mean()  # noqa: E731
    assert held(guided) < held(plain)  # the held rows moved toward the prefix


def bad_prefixes() -> list[tuple[str, dict, str, str]]:
    p = np.zeros((4, 4), np.float32)
    return [
        ("not an array", {"prefix": [[0.0] * 4]}, "prefix", "float [P, 4] array"),
        ("wrong width", {"prefix": np.zeros((4, 3), np.float32)}, "prefix", "got [4, 3]"),
        ("longer than the chunk", {"prefix": np.zeros((CHUNK + 1, 4), np.float32)}, "prefix", f"P <= {CHUNK}"),
        ("NaN", {"prefix": np.array([[0, np.nan, 0, 0]], np.float32)}, "prefix", "NaN/inf"),
        ("delay past the prefix", {"prefix": p, "prefix_delay": 5}, "prefix_delay", "[0, 4]"),
        ("delay not an int", {"prefix": p, "prefix_delay": "2"}, "prefix_delay", "integer"),
    ]


CASES = bad_prefixes()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_prefix_gets_an_error_reply(flow_server, case):
    _, extra, field, text = case
    with PolicyClient(flow_server.url, timeout=60) as client:
        with pytest.raises(ServerError) as err:
            client.request({"type": "infer", "obs": make_obs(np.random.default_rng(1)), **extra})
        assert err.value.field == field and text in err.value.message, err.value
        assert client.infer(make_obs(np.random.default_rng(2))).shape == (CHUNK, 4)


def test_a_policy_that_cannot_inpaint_says_so(export_dir, one_thread):
    with load_server(export_dir, port=0) as srv, PolicyClient(srv.url, timeout=60) as client:
        assert not client.metadata["inpainting"]
        with pytest.raises(ServerError, match="needs a flow policy"):
            client.infer(make_obs(np.random.default_rng(0)), prefix=np.zeros((2, 4), np.float32))
        local = Policy.from_pretrained(export_dir, device="cpu")
        obs = make_obs(np.random.default_rng(3))
        np.testing.assert_array_equal(client.infer(obs), predict_local(local, obs))


def test_executor_sends_what_the_current_chunk_still_holds():
    """A fake policy whose replies take 2.5 ticks: after the first chunk, each request carries the current chunk's
    rows from its tick on and, as delay, the ticks the previous overlapping reply took."""
    calls: list[tuple[int, np.ndarray | None, int | None]] = []

    def request(obs: dict, prefix: np.ndarray | None = None, prefix_delay: int | None = None) -> np.ndarray:
        calls.append((obs["tick"], prefix, prefix_delay))
        time.sleep(0.025)
        return np.arange(CHUNK, dtype=np.float32)[:, None] + 100.0 * obs["tick"]  # row i of tick s: 100 s + i

    executor = AsyncChunkExecutor(request, overlap=4, inpaint=True)
    for t in range(3 * CHUNK):
        executor.act({"tick": t})
        time.sleep(0.01)
    executor.close()
    assert calls[0][1] is None  # nothing to continue at the first tick
    for tick, prefix, delay in calls[1:]:
        start = max(s for s, _, _ in calls if s < tick)  # the chunk executing when this request was sent
        np.testing.assert_array_equal(prefix[:, 0], 100.0 * start + np.arange(tick - start, CHUNK))
        assert 1 <= delay <= len(prefix)
    assert any(delay > 1 for _, _, delay in calls[2:])  # measured from the replies, not the default
