"""python-round-robin: exact round robin, marking its answers with `x-round-robin: python`.

A test plugin (see ../README.md). Built by scripts/build-guest-plugins.sh with
componentize-py; state at module level (componentize-py may create a new `Policy`
object per call).
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import Backend, Decision, Decision_Backend, Decision_Reject, Request

HEALTHY: list[int] = []


class Policy(exports.Policy):
    def configure(self, params: str) -> None:
        try:
            value = json.loads(params)
        except ValueError as e:
            raise Err(f"python-round-robin: params are not valid JSON: {e}")
        if not isinstance(value, dict):
            raise Err("python-round-robin: params must be a JSON object")

    def pool_changed(self, generation: int, backends: list[Backend]) -> None:
        global HEALTHY
        HEALTHY = [i for i, b in enumerate(backends) if b.healthy]

    def pick(self, req: Request, tried: int) -> Decision:
        req.add_response_header("x-round-robin", "python")
        exclude = req.tried() if tried else []
        n = len(HEALTHY)
        if n:
            start = (host.counter_add("turn", 1) - 1) % n
            for k in range(n):
                index = HEALTHY[(start + k) % n]
                if index not in exclude:
                    return Decision_Backend(index)
        req.set_reject_body("no healthy backend available")
        return Decision_Reject(503)
