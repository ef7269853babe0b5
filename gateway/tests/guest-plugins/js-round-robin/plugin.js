// js-round-robin: exact round robin, marking its answers with `x-round-robin: js`.
//
// A test plugin (see ../README.md). Built by scripts/build-guest-plugins.sh with
// componentize-js (StarlingMonkey: s64 is BigInt).

import * as host from "gateway:selector/host@0.3.0";

let healthy = [];

function configure(text) {
  let value;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw `js-round-robin: params are not valid JSON: ${e && e.message ? e.message : e}`;
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw "js-round-robin: params must be a JSON object";
  }
}

function poolChanged(_generation, backends) {
  healthy = [];
  for (let i = 0; i < backends.length; i++) {
    if (backends[i].healthy) healthy.push(i);
  }
}

function pick(req, tried) {
  req.addResponseHeader("x-round-robin", "js");
  const exclude = tried > 0 ? Array.from(req.tried()) : [];
  const n = healthy.length;
  if (n > 0) {
    const start = (Number(host.counterAdd("turn", 1n)) - 1) % n;
    for (let k = 0; k < n; k++) {
      const index = healthy[(start + k) % n];
      if (!exclude.includes(index)) return { tag: "backend", val: index };
    }
  }
  req.setRejectBody("no healthy backend available");
  return { tag: "reject", val: 503 };
}

// An exception other than a thrown string ends the call with a trap: the gateway answers
// that request with its fallback round robin. The engine's stderr goes nowhere, so this
// writes the exception (message and stack) to the gateway's log at level 4 (error)
// first: the gateway adds that text to its message for the failed call. A thrown string
// is how `configure` refuses its params: it passes through as it is.
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

// `TypeError: x is undefined` and where it happened. StarlingMonkey's `stack` lists
// only the frames; V8's (Node) starts with the message.
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
