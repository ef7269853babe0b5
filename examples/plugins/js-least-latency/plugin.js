// js-least-latency: least latency with a floor.
//
// Among the healthy backends the request has not tried yet, pick the one with the
// lowest `stats(i).ewma-latency-us`. Latencies below `floor_us` (default 1000 µs)
// count as equal to the floor, so fast backends (and new ones, whose EWMA is still
// 0) share the load in exact round robin (host counter) instead of one of them
// taking everything because it is a few µs faster. 503 when nothing is left.
//
// Params (JSON): {"floor_us": 1000}
//
// Written to run unchanged on both JS engines (see README.md):
// - QuickJS (componentize-qjs) maps u64/s64 to Number and `none` to null;
// - StarlingMonkey (componentize-js) maps them to BigInt and `none` to undefined,
//   and passing a Number where it wants a BigInt (or a BigInt to QuickJS) traps.
// The engine is detected from the type of `generation` in `poolChanged`, which the
// gateway always calls before the first `pick`.

import * as host from "gateway:selector/host@0.3.0";

const DEFAULT_FLOOR_US = 1000;

let floorUs = DEFAULT_FLOOR_US;
let healthy = []; // indexes of the healthy backends
let one = 1; // `1` as this engine wants an s64: 1 (QuickJS) or 1n (StarlingMonkey)

function fail(message) {
  // result<_, string>: both engines turn a thrown string into `err(message)`.
  throw `js-least-latency: ${message}; expected {"floor_us": 1000}`;
}

function configure(params) {
  let value;
  try {
    value = JSON.parse(params);
  } catch (e) {
    fail(`params are not valid JSON (${e && e.message ? e.message : e})`);
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    fail("params must be a JSON object");
  }
  for (const key of Object.keys(value)) {
    if (key !== "floor_us") fail(`unknown param ${JSON.stringify(key)}`);
  }
  if (value.floor_us === undefined) {
    floorUs = DEFAULT_FLOOR_US;
  } else {
    const f = value.floor_us;
    if (typeof f !== "number" || !Number.isInteger(f) || f < 0 || f > 4294967295) {
      fail(`"floor_us" must be an integer number of microseconds >= 0, got ${JSON.stringify(f)}`);
    }
    floorUs = f;
  }
}

function poolChanged(generation, backends) {
  one = typeof generation === "bigint" ? BigInt(1) : 1;
  healthy = [];
  for (let i = 0; i < backends.length; i++) {
    if (backends[i].healthy) healthy.push(i);
  }
}

// A decision is plain numbers: `{ tag: "backend", val: index }` or
// `{ tag: "reject", val: status }` (the text goes through `req.setRejectBody`).
function reject(req, status, text) {
  req.setRejectBody(text);
  return { tag: "reject", val: status };
}

// `tried` counts the backends earlier attempts of this request used; only a retry
// (tried > 0) asks the gateway which ones.
function pick(req, tried) {
  const exclude = tried > 0 ? Array.from(req.tried()) : [];
  let best = Infinity;
  let ties = [];
  for (const i of healthy) {
    if (exclude.length && exclude.includes(i)) continue;
    let lat = host.stats(i).ewmaLatencyUs;
    if (lat < floorUs) lat = floorUs;
    if (lat < best) {
      best = lat;
      ties = [i];
    } else if (lat === best) {
      ties.push(i);
    }
  }
  if (ties.length === 0) return reject(req, 503, "no healthy backend available");
  let chosen = ties[0];
  if (ties.length > 1) {
    // counter-add returns an s64: Number or BigInt depending on the engine.
    const turn = Number(host.counterAdd("turn", one)) - 1;
    chosen = ties[((turn % ties.length) + ties.length) % ties.length];
  }
  return { tag: "backend", val: chosen };
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
