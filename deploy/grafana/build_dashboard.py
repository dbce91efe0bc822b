"""Builds the pdserve Grafana dashboard (`pdserve.json` beside this file) from the metric catalogue.

Run `python deploy/grafana/build_dashboard.py` after changing a panel; commit both files
(tests/deploy/test_dashboards.py checks the JSON is this script's output and that every query
names only catalogue metrics and labels). Edit panels here, never in the JSON.

Latency panels are split by `role`: the router's histograms are what the client sees, the
nodes' are their own part. SLO variables show milliseconds and substitute the bucket boundary
in seconds (`1000 : 1`), because the attainment ratio reads the bucket whose `le` is the target.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.metrics import LATENCY_BUCKETS

OUT = Path(__file__).with_name("pdserve.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'model=~"$model", role=~"$role", node=~"$node"'
ROUTER = 'model=~"$model", role="router"'
RATE = "[$__rate_interval]"
GRID_WIDTH = 24


# --- PromQL helpers -------------------------------------------------------------------------------

def le_is(var: str) -> str:
    """Matcher for the bucket at an SLO variable's boundary. prometheus_client writes 1.0 as "1.0",
    Prometheus 3 normalizes it to "1"; the variable's value is the short form, so match both."""
    return f'le=~"${{{var}}}|${{{var}}}.0"'


def quantile(q: float, metric: str, sel: str = SEL, by: str = "role") -> str:
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{sel}}}{RATE})))"


def attainment(metric: str, slo_var: str, sel: str = SEL, by: str = "role") -> str:
    """Fraction of requests at or under the target: bucket at le=target over the count."""
    return (f"sum by ({by}) (rate({metric}_bucket{{{sel}, {le_is(slo_var)}}}{RATE}))\n"
            f"/ sum by ({by}) (rate({metric}_count{{{sel}}}{RATE}))")


def rate_by(metric: str, by: str, sel: str = SEL) -> str:
    return f"sum by ({by}) (rate({metric}{{{sel}}}{RATE}))"


# --- panel helpers ----------------------------------------------------------------------------------

def target(expr: str, legend: str = "", **extra) -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "range": True, **extra}


def quantile_targets(metric: str, qs=(0.5, 0.9, 0.99), by: str = "role") -> list[dict]:
    """One line per quantile and `by` group, e.g. "decode p99"."""
    return [target(quantile(q, metric, by=by), f"{{{{{by}}}}} p{round(q * 100)}") for q in qs]


def timeseries(title: str, targets: list[dict], unit: str = "short", description: str = "",
               width: int = 12, height: int = 8, max_value: float | None = None, stack: bool = False,
               thresholds: list[tuple[str, float | None]] = ()) -> dict:
    defaults = {"unit": unit, "min": 0, "custom": {"lineWidth": 1, "fillOpacity": 10 if stack else 0,
                                                   "stacking": {"mode": "normal" if stack else "none"}}}
    if max_value is not None:
        defaults["max"] = max_value
    if thresholds:
        defaults["thresholds"] = threshold_steps(thresholds)
        defaults["custom"]["thresholdsStyle"] = {"mode": "dashed"}
    return {"type": "timeseries", "title": title, "description": description, "datasource": DS,
            "targets": targets, "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}},
            "gridPos": {"w": width, "h": height}}


def stat(title: str, expr: str, unit: str, thresholds: list[tuple[str, float | None]], description: str = "",
         width: int = 6) -> dict:
    return {"type": "stat", "title": title, "description": description, "datasource": DS,
            "targets": [target(expr, instant=True, range=False)],
            "fieldConfig": {"defaults": {"unit": unit, "thresholds": threshold_steps(thresholds)},
                            "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "background", "graphMode": "none", "textMode": "value"},
            "gridPos": {"w": width, "h": 4}}


def heatmap(title: str, expr: str, legend: str, description: str = "", repeat: str | None = None) -> dict:
    panel = {"type": "heatmap", "title": title, "description": description, "datasource": DS,
             "targets": [target(expr, legend, format="time_series")],
             "fieldConfig": {"defaults": {}, "overrides": []},
             "options": {"calculate": False, "cellGap": 1, "rowsFrame": {"layout": "auto"},
                         "color": {"mode": "scheme", "scheme": "Oranges", "scale": "exponential",
                                   "exponent": 0.5, "steps": 64},
                         "yAxis": {"axisPlacement": "left", "unit": "none"},
                         "tooltip": {"mode": "single", "yHistogram": False}, "legend": {"show": True}},
             "gridPos": {"w": 12, "h": 10}}
    if repeat:
        panel.update(repeat=repeat, repeatDirection="h", maxPerRow=2)
    return panel


def table(title: str, expr: str, hidden: list[str], description: str = "") -> dict:
    return {"type": "table", "title": title, "description": description, "datasource": DS,
            "targets": [target(expr, format="table", instant=True, range=False)],
            "transformations": [{"id": "organize", "options": {"excludeByName": {k: True for k in hidden}}}],
            "fieldConfig": {"defaults": {}, "overrides": []}, "options": {"showHeader": True},
            "gridPos": {"w": 24, "h": 6}}


def threshold_steps(steps: list[tuple[str, float | None]]) -> dict:
    return {"mode": "absolute", "steps": [{"color": color, "value": value} for color, value in steps]}


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"w": GRID_WIDTH, "h": 1}}


def lay_out(panels: list[dict]) -> list[dict]:
    """Assign ids and grid positions left to right, wrapping at the grid width; rows start a line."""
    x = y = line_height = 0
    for panel_id, panel in enumerate(panels, start=1):
        pos = panel["gridPos"]
        if panel["type"] == "row" or x + pos["w"] > GRID_WIDTH:
            x, y, line_height = 0, y + line_height, 0
        pos.update(x=x, y=y)
        panel["id"] = panel_id
        x += pos["w"]
        line_height = max(line_height, pos["h"])
        if panel["type"] == "row":
            x, y, line_height = 0, y + pos["h"], 0
    return panels


# --- variables --------------------------------------------------------------------------------------

def query_variable(name: str, query: str, label: str) -> dict:
    return {"type": "query", "name": name, "label": label, "datasource": DS,
            "query": {"query": query, "refId": f"{name}-query"}, "definition": query,
            "refresh": 2, "multi": True, "includeAll": True, "allValue": ".*", "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": []}


def slo_variable(name: str, label: str, default_ms: int) -> dict:
    """Options are the latency bucket boundaries: text in ms, value in seconds (the `le` label)."""
    options = [{"text": f"{b * 1000:g}", "value": f"{b:g}", "selected": f"{b * 1000:g}" == str(default_ms)}
               for b in LATENCY_BUCKETS]
    current = next(o for o in options if o["selected"])
    return {"type": "custom", "name": name, "label": label,
            "description": "SLO target in ms. Must be a histogram bucket boundary: the LATENCY_BUCKETS, or a "
                           "target given to `pdserve up --slo` (add it as `MS : SECONDS` here).",
            "query": ",".join(f"{o['text']} : {o['value']}" for o in options),
            "current": {"selected": True, "text": current["text"], "value": current["value"]},
            "options": options, "multi": False, "includeAll": False, "hide": 0}


def variables() -> list[dict]:
    return [
        {"type": "datasource", "name": "datasource", "label": "Prometheus", "query": "prometheus",
         "current": {}, "options": [], "refresh": 1, "hide": 0},
        query_variable("model", "label_values(pdserve:node_info, model)", "model"),
        query_variable("role", 'label_values(pdserve:node_info{model=~"$model"}, role)', "role"),
        query_variable("node", 'label_values(pdserve:node_info{model=~"$model", role=~"$role"}, node)', "node"),
        {**query_variable("layer", 'label_values(pdserve:expert_tokens_total{model=~"$model"}, layer)',
                          "MoE layer"), "includeAll": False, "current": {}},
        slo_variable("ttft_slo_ms", "TTFT SLO (ms)", 1000),
        slo_variable("tpot_slo_ms", "TPOT SLO (ms)", 50),
        slo_variable("itl_slo_ms", "ITL SLO (ms)", 50),
    ]


# --- panels -----------------------------------------------------------------------------------------

TTFT = "pdserve:time_to_first_token_seconds"
TPOT = "pdserve:request_time_per_output_token_seconds"
ITL = "pdserve:inter_token_latency_seconds"
E2E = "pdserve:e2e_request_latency_seconds"
RED_GREEN = [("red", None), ("orange", 0.95), ("green", 0.99)]


def slo_panels() -> list[dict]:
    def range_attainment(metric: str, var: str) -> str:
        return (f"sum(increase({metric}_bucket{{{ROUTER}, {le_is(var)}}}[$__range]))\n"
                f"/ sum(increase({metric}_count{{{ROUTER}}}[$__range]))")

    def ratio(metric: str, var: str) -> str:
        return f"({attainment(metric, var, sel=ROUTER, by='model')})"

    both_lower_bound = (f"clamp_min({ratio(TTFT, 'ttft_slo_ms')}\n+ {ratio(TPOT, 'tpot_slo_ms')} - 1, 0)\n"
                        f"* {rate_by(E2E + '_count', 'model', ROUTER)}")
    return [
        row("Service level (router: what clients see)"),
        stat("TTFT ≤ ${ttft_slo_ms:text} ms (time range)", range_attainment(TTFT, "ttft_slo_ms"), "percentunit",
             RED_GREEN, "Fraction of requests whose first token came within the TTFT target."),
        stat("TPOT ≤ ${tpot_slo_ms:text} ms (time range)", range_attainment(TPOT, "tpot_slo_ms"), "percentunit",
             RED_GREEN, "Fraction of requests whose mean time per output token met the TPOT target."),
        stat("ITL ≤ ${itl_slo_ms:text} ms (time range)", range_attainment(ITL, "itl_slo_ms"), "percentunit",
             RED_GREEN, "Fraction of streamed token gaps within the ITL target."),
        stat("Requests in flight", f"sum(pdserve:router_requests_in_flight{{{ROUTER}}})", "short",
             [("green", None)]),
        timeseries("SLO attainment", [
            target(attainment(TTFT, "ttft_slo_ms"), "TTFT {{role}}"),
            target(attainment(TPOT, "tpot_slo_ms"), "TPOT {{role}}"),
            target(attainment(ITL, "itl_slo_ms"), "ITL {{role}}"),
        ], "percentunit", "Fraction of requests at or under each target: bucket at le=target / count.",
            max_value=1),
        timeseries("Goodput (requests/s meeting SLOs)", [
            target(rate_by(E2E + "_count", "model", ROUTER), "finished {{model}}"),
            target(rate_by(TTFT + "_bucket", "model", f'{ROUTER}, {le_is("ttft_slo_ms")}'), "within TTFT {{model}}"),
            target(rate_by(TPOT + "_bucket", "model", f'{ROUTER}, {le_is("tpot_slo_ms")}'), "within TPOT {{model}}"),
            target(both_lower_bound, "within both, lower bound {{model}}"),
        ], "reqps", "Per-request goodput needs each request's TTFT and TPOT together (pdserve bench "
           "--goodput). From the separate histograms: at most the smaller series, at least "
           "(TTFT attainment + TPOT attainment - 1) x finished requests/s."),
    ]


def traffic_panels() -> list[dict]:
    return [
        row("Traffic"),
        timeseries("Request throughput by finish reason", [
            target(rate_by("pdserve:request_success_total", "role, finished_reason"),
                   "{{role}} {{finished_reason}}"),
        ], "reqps", stack=True),
        timeseries("Failed requests by reason", [
            target(rate_by("pdserve:request_failure_total", "role, reason"), "{{role}} {{reason}}"),
        ], "reqps", stack=True),
        timeseries("Prompt tokens/s", [target(rate_by("pdserve:prompt_tokens_total", "role"), "{{role}}")],
                   "short"),
        timeseries("Generation tokens/s", [target(rate_by("pdserve:generation_tokens_total", "role"), "{{role}}")],
                   "short"),
        timeseries("Prompt length", quantile_targets("pdserve:request_prompt_tokens", (0.5, 0.99)), "short"),
        timeseries("Output length", quantile_targets("pdserve:request_generation_tokens", (0.5, 0.99)), "short"),
    ]


def latency_panels() -> list[dict]:
    def with_slo(metric: str, var: str) -> list[dict]:
        return quantile_targets(metric) + [target(f"vector(${var})", "SLO target")]

    return [
        row("Latency"),
        timeseries("TTFT", with_slo(TTFT, "ttft_slo_ms"), "s", "Time to first token."),
        timeseries("TPOT", with_slo(TPOT, "tpot_slo_ms"), "s", "Time per output token, per request."),
        timeseries("ITL", with_slo(ITL, "itl_slo_ms"), "s", "Gap between streamed token deltas."),
        timeseries("E2E latency", quantile_targets(E2E), "s"),
        timeseries("Queue time", quantile_targets("pdserve:request_queue_time_seconds", (0.5, 0.99)), "s",
                   width=8),
        timeseries("Prefill time", quantile_targets("pdserve:request_prefill_time_seconds", (0.5, 0.99)), "s",
                   width=8),
        timeseries("Decode time", quantile_targets("pdserve:request_decode_time_seconds", (0.5, 0.99)), "s",
                   width=8),
    ]


def engine_panels() -> list[dict]:
    by_rank = "role, node, rank"
    legend = "{{role}} {{node}} rank {{rank}}"
    return [
        row("Engine (per role and rank)"),
        timeseries("Running requests", [target(f"sum by ({by_rank}) (pdserve:num_requests_running{{{SEL}}})",
                                               legend)], width=8),
        timeseries("Waiting requests", [target(f"sum by ({by_rank}) (pdserve:num_requests_waiting{{{SEL}}})",
                                               legend)], width=8),
        timeseries("Reserved requests (decode: KV waiting for prefill)",
                   [target(f"sum by ({by_rank}) (pdserve:num_requests_reserved{{{SEL}}})", legend)], width=8),
        timeseries("KV cache usage", [target(f"max by ({by_rank}) (pdserve:kv_cache_usage_perc{{{SEL}}})", legend)],
                   "percentunit", max_value=1, thresholds=[("green", None), ("red", 0.95)], width=8),
        timeseries("KV cache pages", [target(f"max by ({by_rank}) (pdserve:kv_cache_pages_total{{{SEL}}})", legend)],
                   width=8),
        timeseries("Prefix cache hit rate", [
            target(f"{rate_by('pdserve:prefix_cache_hits_total', 'role, node')}\n"
                   f"/ {rate_by('pdserve:prefix_cache_queries_total', 'role, node')}", "{{role}} {{node}}"),
        ], "percentunit", "Prompt tokens served from the prefix cache / prompt tokens looked up.",
            max_value=1, width=8),
        timeseries("Preemptions/s", [target(rate_by("pdserve:num_preemptions_total", by_rank), legend)]),
        timeseries("Engine steps/s", [target(rate_by("pdserve:engine_steps_total", by_rank), legend)]),
        timeseries("Triton compiles while serving", [
            target(f"max by ({by_rank}) (pdserve:jit_compiles_while_serving_total{{{SEL}}})", legend)],
            description="Kernels compiled after start-up; each held a served step (the node log names it)."),
    ]


def kv_transfer_panels() -> list[dict]:
    return [
        row("KV transfer (prefill → decode)"),
        timeseries("KV transfer bandwidth", [target(rate_by("pdserve:kv_transfer_bytes_total", "node"), "{{node}}")],
                   "Bps", width=8),
        timeseries("KV transfer time", quantile_targets("pdserve:kv_transfer_time_seconds", (0.5, 0.99), by="node"),
                   "s", "Per request, from the prefill node.", width=8),
        timeseries("KV transfer failures/s", [
            target(rate_by("pdserve:kv_transfer_failures_total", "node, reason"), "{{node}} {{reason}}"),
        ], width=8, stack=True),
        timeseries("KV push exposed after prefill", quantile_targets("pdserve:kv_transfer_exposed_seconds",
                                                                     (0.5, 0.99), by="node"),
                   "s", "From the end of the prefill compute to the push's completion: what the hand-off adds "
                   "to TTFT.", width=12),
        timeseries("Wait for the decode node's KV destination", quantile_targets(
            "pdserve:kv_destination_wait_seconds", (0.5, 0.99), by="node"),
            "s", "Time a computed prompt waited for its destination (the decode node's reservation).", width=12),
        timeseries("KV push: post delay and write tail (p50, p99)", [
            target(quantile(q, metric, by="node"), f"{{{{node}}}} {what} p{round(q * 100)}")
            for metric, what in (("pdserve:kv_post_delay_seconds", "post delay"),
                                 ("pdserve:kv_write_tail_seconds", "write tail"),
                                 ("pdserve:kv_write_lock_wait_seconds", "lock wait"),
                                 ("pdserve:kv_write_call_seconds", "NIXL post")) for q in (0.5, 0.99)],
            "s", "Post delay: from a push's first WRITE being possible to its post. Write tail: from its last "
            "WRITE posted to all of them done. Lock wait and NIXL post: a push's WRITEs waiting for the agent "
            "lock and inside NIXL's calls (summed per push).", width=24),
        timeseries("KV WRITEs per push (p50, p99)", quantile_targets("pdserve:kv_writes_per_push", (0.5, 0.99),
                                                                      by="node"),
                   "short", "1: all layers in one WRITE after the prefill; up to one per layer when pushed layer "
                   "by layer (layers done together go in one).", width=24),
    ]


def expert_panels() -> list[dict]:
    return [
        row("Expert parallelism"),
        timeseries("EP imbalance per layer (max / mean rank load)", [
            target(f"max by (layer) (pdserve:ep_imbalance{{{SEL}}})", "layer {{layer}}"),
        ], thresholds=[("green", None), ("red", 1.5)]),
        timeseries("EPLB rebalances", [
            target(f"sum by (role, node) (increase(pdserve:eplb_rebalances_total{{{SEL}}}{RATE}))",
                   "{{role}} {{node}}"),
        ]),
        heatmap("Expert load, layer $layer (tokens/s)",
                f'sum by (expert) (rate(pdserve:expert_tokens_total{{{SEL}, layer=~"$layer"}}{RATE}))', "{{expert}}",
                "Tokens routed to each logical expert; one panel per selected layer.", repeat="layer"),
    ]


def cluster_panels() -> list[dict]:
    return [
        row("Cluster"),
        timeseries("Router nodes by state", [
            target('sum by (node_role, state) (pdserve:router_nodes{model=~"$model"})', "{{node_role}} {{state}}"),
        ], stack=True),
        timeseries("Scrape targets up", [
            target('up{job="pdserve", role=~"$role", node=~"$node"}', "{{role}} {{node}}"),
        ], max_value=1),
        table("Processes (node_info)", f"pdserve:node_info{{{SEL}}}", ["Time", "Value", "__name__"]),
    ]


def build() -> dict:
    panels = (slo_panels() + traffic_panels() + latency_panels() + engine_panels() + kv_transfer_panels()
              + expert_panels() + cluster_panels())
    return {
        "title": "pdserve", "uid": "pdserve", "description": "Disaggregated prefill/decode serving: SLOs, "
        "traffic, latency, engines, KV transfer, expert parallelism.", "tags": ["pdserve", "llm-serving"],
        "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1, "timezone": "browser",
        "time": {"from": "now-1h", "to": "now"}, "refresh": "10s",
        "annotations": {"list": []}, "links": [],
        "templating": {"list": variables()},
        "panels": lay_out(panels),
    }


def render(dashboard: dict) -> str:
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    OUT.write_text(render(build()))
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
