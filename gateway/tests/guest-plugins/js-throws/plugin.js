// js-throws: every `pick` throws (`RangeError: js-throws: no route for <path>`).
//
// A test plugin (see ../README.md). `configure` and `poolChanged` work, so it loads;
// in traffic every request falls back, and the gateway's log line for the failure
// carries the exception's message and stack, which `reportErrors` (as in the
// `gateway plugin new --lang js` template) writes with `host.log(4, ...)`. Built by
// scripts/build-guest-plugins.sh with componentize-js.

import * as host from "gateway:selector/host@0.3.0";

let count = 0;

function configure(_text) {}

function poolChanged(_generation, backends) {
  count = backends.length;
}

function route(path) {
  throw new RangeError(`js-throws: no route for ${path} (${count} backends)`);
}

function pick(req, _tried) {
  return route(req.path());
}

// As in the template: an exception other than a thrown string is written to the
// gateway's log at level 4 (error), then thrown again.
function reportErrors(fn) {
  return (...args) => {
    try {
      return fn(...args);
    } catch (err) {
      if (typeof err !== "string") host.log(4, describeError(err));
      throw err;
    }
  };
}

function describeError(err) {
  const text = String(err);
  const stack = err && typeof err.stack === "string" ? err.stack : "";
  return stack.startsWith(text) ? stack : `${text}\n${stack}`.trimEnd();
}

export const policy = {
  configure: reportErrors(configure),
  poolChanged: reportErrors(poolChanged),
  pick: reportErrors(pick),
};
