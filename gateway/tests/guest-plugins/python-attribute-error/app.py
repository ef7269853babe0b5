"""python-attribute-error: a round robin with a typo in `pick`, the bug issue 12 starts from.

`configure` and `pool_changed` work, so the plugin loads and `gateway plugin check` accepts
it; every `pick` raises AttributeError (`req.paht()`), so in traffic every request falls
back. `gateway plugin check --smoke` calls `pick` and catches it before it ships.
"""

import functools
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
        pass

    @report_errors
    def pool_changed(self, generation: int, backends: list[Backend]) -> None:
        global HEALTHY
        HEALTHY = [i for i, b in enumerate(backends) if b.healthy]

    @report_errors
    def pick(self, req: Request, tried: int) -> Decision:
        if req.paht().startswith("/admin"):  # the typo: `path`
            return Decision_Reject(403)
        n = len(HEALTHY)
        if n:
            return Decision_Backend(HEALTHY[(host.counter_add("turn", 1) - 1) % n])
        return Decision_Reject(503)
