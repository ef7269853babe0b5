"""python-pass: the first step of a chain that decides only for requests naming a backend.

A test plugin (see ../README.md). A request with `x-backend: N` goes to the backend at
index N, with the reason `x-backend asked for N`; any other request is passed to the
next strategy of the chain, with the reason `no x-backend header`. Built by
scripts/build-guest-plugins.sh with componentize-py.
"""

from wit_world import exports
from wit_world.imports.types import Backend, Decision, Decision_Backend, Decision_Pass, Request

COUNT = 0


class Policy(exports.Policy):
    def configure(self, params: str) -> None:
        pass

    def pool_changed(self, generation: int, backends: list[Backend]) -> None:
        global COUNT
        COUNT = len(backends)

    def pick(self, req: Request, tried: int) -> Decision:
        asked = req.header("x-backend")
        if asked is not None and asked.isdigit() and int(asked) < COUNT and tried == 0:
            req.set_reason(f"x-backend asked for {asked}")
            return Decision_Backend(int(asked))
        req.set_reason("no x-backend header")
        return Decision_Pass()
