"""python-pass: the first step of a chain that decides only for requests naming a backend.

A test plugin (see ../README.md). A request with `x-backend: N` goes to the backend at
index N, with the reason `x-backend asked for N`; any other request is passed to the
next strategy of the chain, with the reason `no x-backend header`. Built by
scripts/build-guest-plugins.sh with componentize-py.
"""

import functools
import traceback

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import Backend, Decision, Decision_Backend, Decision_Pass, Request

COUNT = 0


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
        global COUNT
        COUNT = len(backends)

    @report_errors
    def pick(self, req: Request, tried: int) -> Decision:
        asked = req.header("x-backend")
        if asked is not None and asked.isdigit() and int(asked) < COUNT and tried == 0:
            req.set_reason(f"x-backend asked for {asked}")
            return Decision_Backend(int(asked))
        req.set_reason("no x-backend header")
        return Decision_Pass()
