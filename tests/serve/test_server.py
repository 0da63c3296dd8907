"""The policy server over real websocket connections: exact round trip, per-connection episodes, bad input, health,
disconnects. Servers run in a thread of this process on a free port and are always stopped."""

from __future__ import annotations

import threading
import time

import msgpack
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.serve.conftest import CHUNK, frame, make_obs, predict_local
from vla_scale.policy import Policy
from vla_scale.serve import PolicyClient, ServerError
from vla_scale.serve import protocol as proto
from vla_scale.serve.server import load_server

MAX_BYTES = 2**20  # 1 MiB request limit for these tests; 4 MiB closes the connection


@pytest.fixture(scope="module")
def server(export_dir, one_thread):
    with load_server(export_dir, port=0, max_message_bytes=MAX_BYTES, control_rate_hz=10.0) as srv:
        yield srv


@pytest.fixture(scope="module")
def local(export_dir, one_thread) -> Policy:
    return Policy.from_pretrained(export_dir, device="cpu")


def test_metadata_on_connect(server, export_dir):
    with PolicyClient(server.url, timeout=30) as client:
        meta = client.metadata
        assert meta["cameras"] == ["rgb_static"] and meta["static_camera"] == "rgb_static" and not meta["wrist_camera"]
        assert meta["chunk_size"] == CHUNK and meta["window_size"] == 1 and not meta["stepwise"]
        assert meta["state"] == {"dim": 4, "dtype": "float32", "required": True}
        assert meta["action"]["dim"] == 4 and meta["action"]["space"] == "continuous"
        assert meta["spaces"]["action"]["binary"] == [3]  # the toy set's gripper, as declared in the export
        assert meta["control_rate_hz"] == 10.0 and meta["instruction"]["encodings"] == ["utf-8"]
        assert meta["image"]["dtype"] == "uint8" and meta["max_message_bytes"] == MAX_BYTES
        assert meta["policy"] == str(export_dir) and meta["protocol"] == proto.PROTOCOL_VERSION
        assert client.request({"type": "metadata"})["chunk_size"] == CHUNK


def test_round_trip_equals_in_process_predict(server, local):
    rng = np.random.default_rng(1)
    with PolicyClient(server.url, timeout=30) as client:
        client.reset(seed=3)
        local.reset(seed=3)
        for step in range(3):
            obs = make_obs(rng, instruction=["touch the red block", "push the blue block to the goal"][step % 2])
            got = client.infer(obs)
            want = predict_local(local, obs)
            assert got.dtype == np.float32 and got.shape == (CHUNK, 4)
            np.testing.assert_array_equal(got, want)
        text = "pousse le bloc bleu vers l'objectif, s'il te plaît"
        got = client.infer({**obs, "instruction": text.encode()})  # bytes in the (default) utf-8 encoding
        np.testing.assert_array_equal(got, predict_local(local, {**obs, "instruction": text}))


def test_reset_isolates_episodes_of_concurrent_clients(history_export_dir, one_thread):
    """Two connections interleave their episodes on one model with an LSTM history head; each gets what a
    policy of its own would answer, and a reset on one leaves the other's history alone."""
    rng = np.random.default_rng(2)
    obs = [make_obs(rng) for _ in range(6)]
    ref_a, ref_b = (Policy.from_pretrained(history_export_dir, device="cpu") for _ in range(2))
    with load_server(history_export_dir, port=0) as srv, PolicyClient(srv.url) as a, PolicyClient(srv.url) as b:
        assert a.metadata["stepwise"] and a.metadata["window_size"] == 3
        a.reset(0)
        b.reset(0)
        got_a = [a.infer(obs[0]), None, None]
        got_b = [b.infer(obs[1])]
        got_a[1] = a.infer(obs[2])
        b.reset(0)
        got_b.append(b.infer(obs[3]))
        got_a[2] = a.infer(obs[4])
        assert srv.metadata()["stepwise"] and a.health()["sessions"] == 2
    want_a = [predict_local(ref_a, obs[i]) for i in (0, 2, 4)]
    want_b = [predict_local(ref_b, obs[1])]
    ref_b.reset(0)
    want_b.append(predict_local(ref_b, obs[3]))
    for got, want in zip(got_a + got_b, want_a + want_b, strict=True):
        np.testing.assert_array_equal(got, want)
    fresh = Policy.from_pretrained(history_export_dir, device="cpu")
    assert not np.array_equal(predict_local(fresh, obs[4]), got_a[2])  # the history does change the answer


def test_concurrent_episodes_on_a_history_head_each_get_their_own_answers(history_export_dir, one_thread):
    """Four clients request at the same time from their own threads (one server thread each, one model lock):
    every chunk equals what a policy of its own answers for that client's episode."""
    episodes = [[make_obs(np.random.default_rng(10 * c + i)) for i in range(4)] for c in range(4)]
    got: dict[int, list] = {}
    errors: list[BaseException] = []
    with load_server(history_export_dir, port=0) as srv:
        start = threading.Barrier(len(episodes))

        def run(c: int) -> None:
            try:
                with PolicyClient(srv.url, timeout=60) as client:
                    client.reset(0)
                    start.wait(timeout=30)
                    got[c] = [client.infer(obs) for obs in episodes[c]]
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

        threads = [threading.Thread(target=run, args=(c,)) for c in range(len(episodes))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors
    for c, episode in enumerate(episodes):
        ref = Policy.from_pretrained(history_export_dir, device="cpu")
        ref.reset(0)
        for chunk, obs in zip(got[c], episode, strict=True):
            np.testing.assert_array_equal(chunk, predict_local(ref, obs))


def bad_requests() -> list[tuple[str, object, str, str]]:
    """(case, request map or raw frame, field named in the error, text the message must contain)."""
    rng = np.random.default_rng(0)
    good = make_obs(rng)

    def obs(**changes: object) -> dict:
        o = {**good, **changes}
        return {"type": "infer", "obs": {k: v for k, v in o.items() if v is not None}}

    img = "obs.images.rgb_static"
    return [
        ("image dtype", obs(images={"rgb_static": frame(rng).astype(np.float32)}), img, "uint8"),
        ("image shape", obs(images={"rgb_static": np.zeros((48, 48), np.uint8)}), img, "[H, W, 3]"),
        ("image channels", obs(images={"rgb_static": np.zeros((48, 48, 4), np.uint8)}), img, "[48, 48, 4]"),
        ("image too large", obs(images={"rgb_static": np.zeros((5000, 1, 3), np.uint8)}), img, "<= 4096"),
        ("missing camera", obs(images={}), "obs.images", "missing camera(s) ['rgb_static']"),
        ("unknown camera", obs(images={**good["images"], "wrist": frame(rng)}), "obs.images", "unknown camera"),
        ("images not a map", obs(images=frame(rng)), "obs.images", "map camera"),
        ("state length", obs(state=np.zeros(7, np.float32)), "obs.state", "shape [4], got [7]"),
        ("state NaN", obs(state=np.array([0, np.nan, 0, 0], np.float32)), "obs.state", "NaN/inf at index(es) [1]"),
        ("state inf", obs(state=np.array([0, 0, -np.inf, 0], np.float64)), "obs.state", "index(es) [2]"),
        ("state missing", obs(state=None), "obs.state", "uses proprioceptive state"),
        ("state as list", obs(state=[0.0, 0.0, 0.0, 0.0]), "obs.state", "float [4] array"),
        ("instruction type", obs(instruction=7), "obs.instruction", "expected a string, got int"),
        ("instruction bytes", obs(instruction=b"\xff\xfe"), "obs.instruction", "not valid utf-8"),
        (
            "instruction encoding",
            {**obs(), "obs": {**good, "instruction_encoding": "utf-16"}},
            "obs.instruction_encoding",
            "unknown instruction encoding 'utf-16'",
        ),
        ("seed", {**obs(), "seed": "one"}, "seed", "integer"),
        ("no obs", {"type": "infer"}, "obs", "expected a map"),
        ("message type", {"type": "teleport"}, "type", "unknown message type 'teleport'"),
        ("no type", {"obs": good}, "type", "unknown message type None"),
        (
            "array bytes",
            proto.pack({"x": {"__ndarray__": True, "dtype": "<f4", "shape": [4], "data": b"\0" * 12}}),
            "x",
            "needs 16 bytes, got 12",
        ),
        (
            "array dtype",
            proto.pack({"x": {"__ndarray__": True, "dtype": "|O", "shape": [1], "data": b"\0" * 8}}),
            "x",
            "not allowed",
        ),
        ("not msgpack", b"\xc1garbage", "message", "undecodable"),
        ("not a map", msgpack.packb([1, 2, 3]), "message", "got a list"),
        ("text frame", "hello", "message", "text frame"),
        ("oversized", obs(images={"rgb_static": np.zeros((1024, 512, 3), np.uint8)}), "message", "exceeds"),
    ]


CASES = bad_requests()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_an_error_reply_and_the_next_request_is_served(server, local, case):
    _, request_, field, text = case
    rng = np.random.default_rng(5)
    with PolicyClient(server.url, timeout=30) as client:
        frame_ = request_ if isinstance(request_, bytes | str) else proto.pack({**request_, "id": 99})
        reply = client.send_raw(frame_)
        assert reply["type"] == "error" and reply["field"] == field, reply
        assert text in reply["message"], reply["message"]
        if isinstance(request_, dict) and case[0] != "oversized":  # an oversized request is refused unread
            assert reply["id"] == 99
        obs = make_obs(rng)
        local.reset()
        np.testing.assert_array_equal(client.infer(obs), predict_local(local, obs))


def test_client_raises_server_error_naming_the_field(server):
    with PolicyClient(server.url, timeout=30) as client, pytest.raises(ServerError, match="obs.state") as err:
        client.infer({**make_obs(np.random.default_rng(0)), "state": np.zeros(3, np.float32)})
    assert err.value.field == "obs.state"


def test_message_over_the_hard_limit_closes_only_that_connection(server, local):
    with PolicyClient(server.url, timeout=30) as client:
        with pytest.raises(ConnectionClosed) as closed:
            client.send_raw(b"\0" * (4 * MAX_BYTES + 1))
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009  # message too big
    obs = make_obs(np.random.default_rng(6))
    with PolicyClient(server.url, timeout=30) as client:
        local.reset()
        np.testing.assert_array_equal(client.infer(obs), predict_local(local, obs))


@pytest.fixture(scope="module")
def slow_server(export_dir, one_thread):
    with load_server(export_dir, port=0, delay_s=1.0) as srv:
        yield srv


def test_health_answers_while_another_client_waits_for_inference(slow_server):
    with PolicyClient(slow_server.url) as busy, PolicyClient(slow_server.url) as probe:
        assert probe.health()["status"] == "ok"
        result: dict = {}
        worker = threading.Thread(
            target=lambda: result.setdefault("chunk", busy.infer(make_obs(np.random.default_rng(0))))
        )
        worker.start()
        time.sleep(0.2)
        start = time.perf_counter()
        health = probe.health()
        took = time.perf_counter() - start
        worker.join(timeout=60)
        assert health["busy"] and health["connections"] == 2 and health["sessions"] == 1 and took < 0.5, (health, took)
        assert result["chunk"].shape == (CHUNK, 4)


def test_client_disconnect_mid_request_frees_its_episode(slow_server, local):
    with PolicyClient(slow_server.url) as probe:
        served = probe.health()["served"]
        ws = connect(slow_server.url)
        ws.recv(timeout=30)  # metadata
        ws.send(proto.pack({"type": "infer", "obs": make_obs(np.random.default_rng(0))}))
        time.sleep(0.2)  # the request is running on the model
        ws.close()
        deadline = time.monotonic() + 30
        while (h := probe.health())["served"] == served or h["sessions"] != 0 or h["connections"] != 1:
            assert time.monotonic() < deadline, h
            time.sleep(0.1)
        assert h["status"] == "ok" and not h["busy"]
        obs = make_obs(np.random.default_rng(1))
        local.reset()
        np.testing.assert_array_equal(probe.infer(obs), predict_local(local, obs))


def test_close_from_another_thread_ends_a_waiting_request(slow_server):
    """The client reads its socket in the waiting thread (transport.py); close() must still release it at once."""
    client = PolicyClient(slow_server.url, timeout=30)
    result: dict = {}

    def infer() -> None:
        try:
            client.infer(make_obs(np.random.default_rng(6)))
        except Exception as err:  # noqa: BLE001 - checked below
            result["error"] = err

    worker = threading.Thread(target=infer)
    worker.start()
    time.sleep(0.3)  # the request is on the model (1 s)
    client.close()
    worker.join(timeout=30)
    assert isinstance(result.get("error"), ConnectionClosed), result  # not the chunk the server sends ~0.7 s later


def test_a_late_reply_after_a_timeout_is_dropped_not_taken_by_the_next_request(slow_server):
    obs = make_obs(np.random.default_rng(3))
    with PolicyClient(slow_server.url, timeout=0.3) as client:
        with pytest.raises(TimeoutError):
            client.infer(obs)  # the server takes 1 s
        client.timeout = 30
        health = client.health()  # the timed-out request's reply (id 1) arrives first
        assert health["type"] == "health" and health["id"] == 2
        assert client.infer(obs).shape == (CHUNK, 4)


def test_shutdown_abandons_an_inference_stuck_past_the_grace(export_dir, one_thread):
    srv = load_server(export_dir, port=0, delay_s=8.0, shutdown_grace_s=0.5).start()
    client = PolicyClient(srv.url, timeout=30)
    result: dict = {}

    def infer() -> None:
        try:
            client.infer(make_obs(np.random.default_rng(4)))
        except Exception as err:  # noqa: BLE001 - checked below
            result["error"] = err

    worker = threading.Thread(target=infer)
    worker.start()
    time.sleep(0.5)  # the request is on the model (8 s)
    start = time.perf_counter()
    srv.stop(timeout=30)
    took = time.perf_counter() - start
    worker.join(timeout=30)
    assert took < 5 and srv.abandoned, took  # waiting for the inference would take ~7.5 s
    assert isinstance(result.get("error"), ConnectionClosed)
