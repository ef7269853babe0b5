"""Native tests of app.py under plain CPython (no Wasm):

    python3 -m unittest discover -s examples/plugins/python-path-router

The modules componentize-py generates (wit_world, componentize_py_types) are replaced
by small stand-ins with the same names and shapes.
"""

import sys
import types
import unittest
from dataclasses import dataclass


def install_stubs():
    counters: dict[str, int] = {}
    logs: list[tuple[int, str]] = []

    class Err(Exception):
        def __init__(self, value):
            super().__init__(value)
            self.value = value

    @dataclass
    class Backend:
        id: str
        address: str
        weight: int
        zone: str
        labels: list
        healthy: bool

    @dataclass
    class Decision_Backend:
        value: int

    @dataclass
    class Decision_Reject:
        value: int

    def counter_add(key, delta):
        counters[key] = counters.get(key, 0) + delta
        return counters[key]

    def log(level, message):
        logs.append((level, message))

    modules = {
        "componentize_py_types": {"Err": Err},
        "wit_world": {},
        "wit_world.exports": {"Policy": type("Policy", (), {})},
        "wit_world.imports": {},
        "wit_world.imports.host": {"counter_add": counter_add, "log": log},
        "wit_world.imports.types": {
            "Backend": Backend,
            "Decision": object,
            "Decision_Backend": Decision_Backend,
            "Decision_Reject": Decision_Reject,
            "Request": object,
        },
    }
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
    sys.modules["wit_world"].exports = sys.modules["wit_world.exports"]
    sys.modules["wit_world"].imports = sys.modules["wit_world.imports"]
    sys.modules["wit_world.imports"].host = sys.modules["wit_world.imports.host"]
    sys.modules["wit_world.imports"].types = sys.modules["wit_world.imports.types"]
    return counters, logs, Err, Backend


COUNTERS, LOGS, Err, Backend = install_stubs()
import app  # noqa: E402


class Req:
    """The request resource: the path, the backends already tried, the reject text."""

    def __init__(self, path, tried=()):
        self._path = path
        self._tried = list(tried)
        self.reject_body = None

    def path(self):
        return self._path

    def tried(self):
        return list(self._tried)

    def set_reject_body(self, text):
        self.reject_body = text


def backend(i, role=None, healthy=True):
    labels = [("zone", "x"), ("role", role)] if role else []
    return Backend(f"b{i}", f"127.0.0.1:{9000 + i}", 1, "", labels, healthy)


PARAMS = '{"routes": {"/api": "api", "/api/v2": "v2", "/static": "static"}, "label": "role"}'


class PathRouterTest(unittest.TestCase):
    def setUp(self):
        COUNTERS.clear()
        LOGS.clear()
        app.STATE = app.State()
        # A fresh Policy object per call, as componentize-py may do.
        app.Policy().configure(PARAMS)
        app.Policy().pool_changed(
            1,
            [backend(0, "api"), backend(1, "api"), backend(2, "static"), backend(3), backend(4, "api", healthy=False),
             backend(5, "v2")],
        )

    def picks(self, path, n, exclude=()):
        out = []
        for _ in range(n):
            d = app.Policy().pick(Req(path, exclude), len(exclude))
            out.append(d.value)
        return out

    def test_prefix_goes_round_robin_to_the_labelled_backends(self):
        self.assertEqual(self.picks("/api/books?x=1", 4), [0, 1, 0, 1])
        self.assertEqual(self.picks("/static/app.css", 2), [2, 2])
        # The longest prefix wins.
        self.assertEqual(self.picks("/api/v2/x", 2), [5, 5])

    def test_other_paths_go_round_robin_over_all_healthy(self):
        self.assertEqual(self.picks("/", 6), [0, 1, 2, 3, 5, 0])

    def test_exclude_and_503(self):
        self.assertEqual(self.picks("/api/x", 1, exclude=[0]), [1])
        self.assertEqual(self.picks("/static", 1, exclude=[2]), [503])
        req = Req("/static", [2])
        d = app.Policy().pick(req, 1)
        self.assertEqual(type(d).__name__, "Decision_Reject")
        self.assertIn("role=static", req.reject_body)

    def test_configure_refuses_bad_params(self):
        for params, needle in [
            ("{}", 'missing param "routes"'),
            ("[]", "must be a JSON object"),
            ("nope", "not valid JSON"),
            ('{"routes": []}', '"routes" must be an object'),
            ('{"routes": {"api": "api"}}', 'must start with "/"'),
            ('{"routes": {"/api": 1}}', "non-empty string"),
            ('{"routes": {}, "label": ""}', '"label" must be'),
            ('{"routes": {}, "lable": "role"}', "unknown param"),
        ]:
            with self.assertRaises(Err, msg=params) as cm:
                app.Policy().configure(params)
            self.assertIn(needle, cm.exception.value, params)
        self.assertEqual(LOGS, [], "a refusal is not an error of the plugin")

    def test_an_unexpected_exception_is_logged_with_its_traceback_and_raised_again(self):
        class Broken(Req):
            def path(self):
                raise KeyError("no path today")

        with self.assertRaises(KeyError):
            app.Policy().pick(Broken("/"), 0)
        [(level, text)] = LOGS
        self.assertEqual(level, 4)
        self.assertIn("Traceback (most recent call last):", text)
        self.assertIn("in pick", text)
        self.assertTrue(text.rstrip().endswith("KeyError: 'no path today'"), text)


if __name__ == "__main__":
    unittest.main()
