"""Serve an exported policy to robots and evaluators in other processes: `vla-scale serve EXPORT`.

Why websocket + msgpack (as openpi does) rather than gRPC (LeRobot) or ZMQ (GR00T): a policy server answers
one request/reply stream per robot, which a websocket carries with no schema compiler and no generated code;
msgpack is compact binary, already installed, and carries numpy arrays as raw bytes with their dtype and
shape (`protocol.py`), so a 224 px frame costs a memcpy, not a text encoding. The `websockets` package does
both ends' opening handshakes (its Sans-I/O protocol); after it, `frames.FrameStream` carries the messages
over a blocking socket: on the server a thread per connection that runs its own inference under one model
lock, on the client the thread that waits for the reply (server.py and frames.py say why).

Modules: `protocol` (codec, message types, request checks), `server` (`PolicyServer`, per-connection
episodes), `frames` (websocket framing), `client` (`PolicyClient`), `transport` (the client's connection),
`executor` (`AsyncChunkExecutor`: the next chunk is requested while the current one executes), `agent` (the eval
runner's policy agent through a server), `cli` (`vla-scale serve`).
The client side imports neither torch nor the model: a robot process needs numpy, msgpack and websockets only.
"""

from vla_scale.serve.client import PolicyClient, observation
from vla_scale.serve.executor import AsyncChunkExecutor, ExecutorStats
from vla_scale.serve.protocol import RequestError, ServerError

__all__ = ["AsyncChunkExecutor", "ExecutorStats", "PolicyClient", "RequestError", "ServerError", "observation"]
