"""python-attribute-error: a round robin with a typo in `pick`, the bug issue 12 starts from.

`configure` and `pool_changed` work, so the plugin loads and `gateway plugin check` accepts
it; every `pick` raises AttributeError (`req.paht()`), so in traffic every request falls
back. `gateway plugin check --smoke` calls `pick` and catches it before it ships.
"""

from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import Backend, Decision, Decision_Backend, Decision_Reject, Request

HEALTHY: list[int] = []


class Policy(exports.Policy):
    def configure(self, params: str) -> None:
        pass

    def pool_changed(self, generation: int, backends: list[Backend]) -> None:
        global HEALTHY
        HEALTHY = [i for i, b in enumerate(backends) if b.healthy]

    def pick(self, req: Request, tried: int) -> Decision:
        if req.paht().startswith("/admin"):  # the typo: `path`
            return Decision_Reject(403)
        n = len(HEALTHY)
        if n:
            return Decision_Backend(HEALTHY[(host.counter_add("turn", 1) - 1) % n])
        return Decision_Reject(503)
