"""python-round-robin: exact round robin, marking its answers with `x-round-robin: python`.

A test plugin (see ../README.md). Built by scripts/build-guest-plugins.sh with
componentize-py; state at module level (componentize-py may create a new `Policy`
object per call).
"""

import functools
import json
import traceback

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import Backend, Decision, Decision_Backend, Decision_Reject, Request

HEALTHY: list[int] = []


def report_errors(method):
    """Writes an unexpected exception's traceback to the gateway's log (`host.log` at
    level 4, error), then raises it again: the gateway adds that text to its message for
    the failed call (stderr goes nowhere with --stub-wasi). `Err` passes through."""

    @functools.wraps(method)
    def call(*args):
        try:
            return method(*args)
        except Err:
            raise
        except Exception as e:
            host.log(4, format_traceback(e))
            raise

    return call


def format_traceback(e: BaseException) -> str:
    """`traceback.format_exc()` without the source lines (reading them touches the
    filesystem, which traps with --stub-wasi)."""
    # From the method down: the first frame is report_errors' own.
    frames = traceback.StackSummary.extract(traceback.walk_tb(e.__traceback__.tb_next), lookup_lines=False)
    lines = ["Traceback (most recent call last):\n"]
    lines += [f'  File "{f.filename}", line {f.lineno}, in {f.name}\n' for f in frames]
    return "".join(lines + traceback.format_exception_only(e))


class Policy(exports.Policy):
    @report_errors
    def configure(self, params: str) -> None:
        try:
            value = json.loads(params)
        except ValueError as e:
            raise Err(f"python-round-robin: params are not valid JSON: {e}")
        if not isinstance(value, dict):
            raise Err("python-round-robin: params must be a JSON object")

    @report_errors
    def pool_changed(self, generation: int, backends: list[Backend]) -> None:
        global HEALTHY
        HEALTHY = [i for i, b in enumerate(backends) if b.healthy]

    @report_errors
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
