"""python-path-router: route by path prefix to the backends carrying a label.

Params (JSON):

    {"routes": {"/api": "api", "/static": "static"}, "label": "role"}

A request whose path starts with one of the prefixes (the longest one wins) goes,
in exact round robin, to the healthy backends whose label `label` equals the
mapped value. Any other request goes round robin over all healthy backends.
Backends that an earlier attempt of the request already tried (`req.tried()`, asked
only on a retry) are skipped; when nothing is left the request is answered with 503.

Built with componentize-py (see README.md). componentize-py looks for a class
named after the exported interface (`policy` -> `Policy`) in this module.
"""

import functools
import json
import traceback

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import (
    Backend,
    Decision,
    Decision_Backend,
    Decision_Reject,
    Request,
)

SHAPE = '{"routes": {"/api": "api", "/static": "static"}, "label": "role"}'


def parse_params(params: str):
    """Returns (routes, label) or raises ValueError with a message for the operator."""
    try:
        value = json.loads(params)
    except ValueError as e:
        raise ValueError(f"params are not valid JSON ({e}); expected {SHAPE}")
    if not isinstance(value, dict):
        raise ValueError(f"params must be a JSON object, got {type(value).__name__}; expected {SHAPE}")
    unknown = sorted(set(value) - {"routes", "label"})
    if unknown:
        raise ValueError(f"unknown param(s) {', '.join(map(repr, unknown))}; expected {SHAPE}")
    if "routes" not in value:
        raise ValueError(f'missing param "routes"; expected {SHAPE}')
    routes = value["routes"]
    if not isinstance(routes, dict):
        raise ValueError(f'"routes" must be an object of path prefix -> label value; expected {SHAPE}')
    for prefix, label_value in routes.items():
        if not prefix.startswith("/"):
            raise ValueError(f'"routes": prefix {prefix!r} must start with "/"')
        if not isinstance(label_value, str) or not label_value:
            raise ValueError(f'"routes": the value for {prefix!r} must be a non-empty string, got {json.dumps(label_value)}')
    label = value.get("label", "role")
    if not isinstance(label, str) or not label:
        raise ValueError(f'"label" must be a non-empty string (a backend label key), got {json.dumps(label)}')
    return routes, label


class State:
    """What `configure` and `pool-changed` computed for `pick`."""

    def __init__(self):
        # (prefix, label value), longest prefix first, so that "/api/v2" wins over "/api".
        self.routes: list[tuple[str, str]] = []
        self.label = "role"
        # Indexes of the healthy backends: all, and per value of the label.
        self.healthy: list[int] = []
        self.by_value: dict[str, list[int]] = {}


# Module-level on purpose: componentize-py may create a new `Policy` object for each
# exported call, so state kept on `self` would not survive from `configure` to `pick`.
STATE = State()


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
            routes, label = parse_params(params)
        except ValueError as e:
            raise Err(f"python-path-router: {e}")
        STATE.routes = sorted(routes.items(), key=lambda kv: len(kv[0]), reverse=True)
        STATE.label = label

    @report_errors
    def pool_changed(self, generation: int, backends: list[Backend]) -> None:
        healthy: list[int] = []
        by_value: dict[str, list[int]] = {}
        for i, b in enumerate(backends):
            if not b.healthy:
                continue
            healthy.append(i)
            for key, value in b.labels:
                if key == STATE.label:
                    by_value.setdefault(value, []).append(i)
                    break
        STATE.healthy, STATE.by_value = healthy, by_value

    @report_errors
    def pick(self, req: Request, tried: int) -> Decision:
        # `req` is borrowed: read from it, never close it. `tried` counts the backends
        # earlier attempts used; only a retry asks which ones.
        exclude = req.tried() if tried else []
        path = req.path()
        group, key, what = STATE.healthy, "turn", "healthy backend"
        for prefix, value in STATE.routes:
            if path.startswith(prefix):
                group = STATE.by_value.get(value, [])
                key = "turn:" + value
                what = f"healthy backend with {STATE.label}={value}"
                break
        n = len(group)
        if n:
            start = (host.counter_add(key, 1) - 1) % n
            for k in range(n):
                i = group[(start + k) % n]
                if i not in exclude:
                    return Decision_Backend(i)
        req.set_reject_body(f"no {what} available")
        return Decision_Reject(503)
