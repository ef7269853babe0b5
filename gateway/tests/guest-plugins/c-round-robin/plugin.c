// c-round-robin: exact round robin, marking its answers with `x-round-robin: c`.
//
// The `gateway plugin new --lang c` template's round robin (host counter `turn`, healthy
// backends, `tried` respected, 503 when none is left), plus the response header, so a
// test can tell it answered. scripts/build-guest-plugins.sh builds it in a project made
// by `gateway plugin new --lang c` (for the generated bindings) and wraps it with
// `gateway plugin componentize`.

#include <stdlib.h>
#include <string.h>

#include "gen/selector.h"

typedef exports_gateway_selector_policy_borrow_request_t request_t;
typedef exports_gateway_selector_policy_decision_t decision_t;

// Indexes (positions in the list given to `pool_changed`) of the healthy backends.
// Each instance of the plugin (the gateway keeps one per worker thread) has its own
// globals. State that must be shared by all of them, or survive a hot swap, belongs in
// the host: `gateway_selector_host_counter_add`, `..._kv_get` / `..._kv_set`.
static uint32_t *healthy = NULL;
static size_t healthy_len = 0;

// A `selector_string_t` over a C string literal, without copying it.
static selector_string_t str(const char *s) {
    selector_string_t out = {(uint8_t *)s, strlen(s)};
    return out;
}

// The route's `params` from the gateway config, as a JSON text (`{}` when none).
// Return false and set `err` to refuse bad params: the gateway reports your message and
// does not use this version of the plugin.
bool exports_gateway_selector_policy_configure(selector_string_t *params, selector_string_t *err) {
    bool ok = params->len > 0 && params->ptr[0] == '{';
    selector_string_free(params);
    if (!ok) {
        selector_string_dup(err, "c-round-robin: params must be a JSON object");
        return false;
    }
    return true;
}

// The backend list changed (health checks, drain), or this instance is new. Do the heavy
// work here, not in `pick`: this runs once per change, `pick` once per request. Each
// backend has `id`, `address`, `weight`, `zone`, `labels` and `healthy`.
void exports_gateway_selector_policy_pool_changed(uint64_t generation,
                                                  exports_gateway_selector_policy_list_backend_t *backends) {
    (void)generation;
    uint32_t *next = realloc(healthy, (backends->len ? backends->len : 1) * sizeof(uint32_t));
    if (next) {
        healthy = next;
        healthy_len = 0;
        for (size_t i = 0; i < backends->len; i++) {
            if (backends->ptr[i].healthy) {
                healthy[healthy_len++] = (uint32_t)i;
            }
        }
    }
    exports_gateway_selector_policy_list_backend_free(backends);
}

static bool contains(const selector_list_u32_t *list, uint32_t value) {
    for (size_t i = 0; i < list->len; i++) {
        if (list->ptr[i] == value) {
            return true;
        }
    }
    return false;
}

// Choose a backend for this request (called by the export `pick` below). `req` is
// borrowed: read it with gateway_selector_types_method_request_path(req, &s), ..._header,
// ..._cookie, ..._query_param, ..._client_ip, ..._authority. `tried` counts the backends
// earlier attempts of this request already used (a retry); ..._request_tried lists them:
// never return one of them.
static void choose(request_t req, uint32_t tried, decision_t *ret) {
    // Asked only on a retry: a first attempt copies nothing.
    selector_list_u32_t exclude = {NULL, 0};
    if (tried) {
        gateway_selector_types_method_request_tried(req, &exclude);
    }
    size_t n = healthy_len;
    bool chosen = false;
    if (n) {
        // A counter shared by every worker thread (and kept across hot swaps) makes the
        // round robin exact. Keys are private to the upstream this plugin serves.
        selector_string_t key = str("turn");
        uint64_t turn = (uint64_t)(gateway_selector_host_counter_add(&key, 1) - 1);
        for (size_t k = 0; k < n && !chosen; k++) {
            uint32_t index = healthy[(turn + k) % n];
            if (!contains(&exclude, index)) {
                selector_string_t name = str("x-round-robin"), value = str("c");
                gateway_selector_types_method_request_add_response_header(req, &name, &value);
                ret->tag = GATEWAY_SELECTOR_TYPES_DECISION_BACKEND;
                ret->val.backend = index;
                chosen = true;
            }
        }
    }
    if (tried) {
        selector_list_u32_free(&exclude);
    }
    if (!chosen) {
        // Every healthy backend was tried, or none is healthy: answer the client directly.
        selector_string_t body = str("no healthy backend available");
        gateway_selector_types_method_request_set_reject_body(req, &body);
        ret->tag = GATEWAY_SELECTOR_TYPES_DECISION_REJECT;
        ret->val.reject = 503;
    }
}

// The export. The component model wants a borrowed handle given back before the call
// returns, so `choose` may return from anywhere and this drops `req` after it.
void exports_gateway_selector_policy_pick(request_t req, uint32_t tried, decision_t *ret) {
    choose(req, tried, ret);
    gateway_selector_types_request_drop_borrow(req);
}
