// Native tests of plugin.js under Node (no Wasm): `node --test examples/plugins/js-least-latency/`.
// The WIT import is replaced by an in-memory host that, like the real engines, insists
// on the s64 convention of the engine being simulated (Number for QuickJS, BigInt for
// StarlingMonkey).
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

const source = readFileSync(new URL("./plugin.js", import.meta.url), "utf8");
const IMPORT = 'import * as host from "gateway:selector/host@0.3.0";';
assert.ok(source.includes(IMPORT), "plugin.js imports the host interface");

let loads = 0;
async function load(engine, latencies) {
  const big = engine === "starlingmonkey";
  const counters = new Map();
  const logs = [];
  const host = {
    log(level, message) {
      logs.push([level, message]);
    },
    stats(i) {
      return { activeRequests: 0, ewmaLatencyUs: latencies[i] ?? 0, consecutiveFailures: 0 };
    },
    counterAdd(key, delta) {
      assert.equal(typeof delta, big ? "bigint" : "number", `${engine} s64 convention`);
      const v = (counters.get(key) ?? 0) + Number(delta);
      counters.set(key, v);
      return big ? BigInt(v) : v;
    },
  };
  const key = `__host${loads++}`;
  globalThis[key] = host;
  const code = source.replace(IMPORT, `const host = globalThis.${key};`);
  const mod = await import(`data:text/javascript;base64,${Buffer.from(code).toString("base64")}#${key}`);
  const backends = latencies.map((_, i) => ({ id: `b${i}`, address: "", weight: 1, zone: "", labels: [], healthy: true }));
  return { policy: mod.policy, backends, generation: big ? 1n : 1, logs };
}

// The request resource: `tried()` lists what a retry must avoid; the body of a
// rejection comes back through `setRejectBody`.
function request(tried = []) {
  return {
    rejectBody: null,
    tried: () => Uint32Array.from(tried),
    setRejectBody(text) {
      this.rejectBody = text;
    },
  };
}
const pick = (policy, tried = []) => policy.pick(request(tried), tried.length);
const idx = (d) => (d.tag === "backend" ? d.val : null);

for (const engine of ["quickjs", "starlingmonkey"]) {
  test(`${engine}: lowest latency wins`, async () => {
    const { policy, backends, generation } = await load(engine, [5000, 3000, 9000]);
    policy.configure("{}");
    policy.poolChanged(generation, backends);
    assert.deepEqual([0, 1, 2].map(() => idx(pick(policy))), [1, 1, 1]);
    assert.equal(idx(pick(policy, [1])), 0, "excluded backend is skipped");
  });

  test(`${engine}: below the floor counts as equal, round robin among those`, async () => {
    const { policy, backends, generation } = await load(engine, [200, 900, 0, 4000]);
    policy.configure(JSON.stringify({ floor_us: 1000 }));
    policy.poolChanged(generation, backends);
    assert.deepEqual([0, 1, 2, 3, 4, 5].map(() => idx(pick(policy))), [0, 1, 2, 0, 1, 2]);
    // floor 5000: the 4 ms backend joins them.
    policy.configure(JSON.stringify({ floor_us: 5000 }));
    const picks = new Set([0, 1, 2, 3, 4, 5, 6, 7].map(() => idx(pick(policy))));
    assert.deepEqual([...picks].sort(), [0, 1, 2, 3]);
  });

  test(`${engine}: unhealthy and excluded are skipped; 503 when none is left`, async () => {
    const { policy, backends, generation } = await load(engine, [100, 100]);
    backends[0].healthy = false;
    policy.configure("{}");
    policy.poolChanged(generation, backends);
    assert.equal(idx(pick(policy)), 1);
    const r = request([1]);
    const d = policy.pick(r, 1);
    assert.equal(d.tag, "reject");
    assert.equal(d.val, 503);
    assert.match(r.rejectBody, /no healthy backend/);
  });
}

test("an unexpected exception is logged at error level with its message, then thrown again", async () => {
  const { policy, backends, generation, logs } = await load("starlingmonkey", [100, 200]);
  policy.configure("{}");
  policy.poolChanged(generation, backends);
  const broken = { tried: null }; // `req.tried()` is not a function
  assert.throws(() => policy.pick(broken, 1), TypeError);
  assert.equal(logs.length, 1, `${logs}`);
  const [level, text] = logs[0];
  assert.equal(level, 4);
  assert.match(text, /^TypeError: /);
  assert.match(text, /pick/, "the stack names the function");
});

test("configure refuses bad params with a message", async () => {
  const { policy, logs } = await load("quickjs", []);
  for (const [params, needle] of [
    ["not json", "not valid JSON"],
    ["[1]", "must be a JSON object"],
    ['{"floor_us": -1}', '"floor_us" must be'],
    ['{"floor_us": 1.5}', '"floor_us" must be'],
    ['{"floor": 10}', 'unknown param "floor"'],
  ]) {
    assert.throws(() => policy.configure(params), (e) => typeof e === "string" && e.includes(needle), params);
  }
  policy.configure("{}");
  policy.configure('{"floor_us": 0}');
  assert.deepEqual(logs, [], "a refusal is not an error of the plugin");
});
