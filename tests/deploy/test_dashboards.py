"""The Grafana dashboard and Prometheus rules in deploy/ against the metric catalogue.

Every query may name only series that pdserve exports (engine/metrics.py `all_series()`, plus
Prometheus' own `up` and the rules' recorded series) and only labels those series carry. The
rules and config also go through the real `promtool` (Debian package `prometheus`), including
the burn-rate unit tests in pdserve_rules_test.yaml.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.metrics import BY_NAME, CATALOGUE, LABELS, LATENCY_BUCKETS, ServingMetrics, all_series

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "pdserve-rules.yaml"
CONFIG = PROMETHEUS / "prometheus.yml"
RULES_UNIT_TEST = Path(__file__).with_name("pdserve_rules_test.yaml")

# `up` is Prometheus' own; role and node come from the target labels in targets.json.
UP_LABELS = {"job", "instance", "role", "node"}
# Catalogue metrics the dashboard may leave out. None today: node_info has its table.
NOT_ON_DASHBOARD: set[str] = set()
GRAFANA_BUILTINS = {"__rate_interval", "__range", "__interval"}

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package `prometheus`: apt-get install -y prometheus)")


# --- a small PromQL reader: selectors, their matchers, and grouping clauses --------------------------

AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
                "topk", "quantile", "limitk", "limit_ratio"}
GROUPING = {"by", "without"}
VECTOR_MATCHING = {"on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"bool", "and", "or", "unless", "offset", "atan2"} | GROUPING | VECTOR_MATCHING
TOKEN = re.compile(r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<duration>\d+(?:ms|[smhdwy])\b)
  | (?P<number>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){},])
  | (?P<space>\s+)
""", re.X)
GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


@dataclass
class Query:
    selectors: list[tuple[str, set[str]]] = field(default_factory=list)  # (metric, labels it matches on)
    groupings: list[tuple[set[str], set[str]]] = field(default_factory=list)  # (labels, metrics in scope)
    output_labels: set[str] | None = None  # the outermost aggregation's `by` labels, if any
    errors: list[str] = field(default_factory=list)


def grafana_variables(expr: str) -> set[str]:
    return {a or b for a, b in GRAFANA_VARIABLE.findall(expr)}


def parse(expr: str) -> Query:
    """Reads PromQL well enough to check names: nests (), {} and walks the tokens."""
    text = GRAFANA_VARIABLE.sub("1", expr)
    tokens, pos = [], 0
    while pos < len(text):
        m = TOKEN.match(text, pos)
        assert m, f"cannot read {text[pos:pos + 30]!r} in {expr!r}"
        pos = m.end()
        if m.lastgroup != "space":
            tokens.append((m.lastgroup, m.group()))
    tree, rest = _nest(tokens, None)
    assert not rest, f"unbalanced brackets in {expr!r}"
    query = Query()
    _walk(tree, query)
    return query


def _nest(tokens, closer):
    out = []
    while tokens:
        kind, value = tokens[0]
        tokens = tokens[1:]
        if value in ("(", "{"):
            inner, tokens = _nest(tokens, ")" if value == "(" else "}")
            out.append((value, inner))
        elif value == closer:
            return out, tokens
        else:
            out.append((kind, value))
    assert closer is None, f"missing {closer!r}"
    return out, tokens


def _names(group) -> set[str]:
    return {v for k, v in group[1] if k == "ident"}


def _matcher_labels(group) -> set[str]:
    items = group[1]
    return {v for (k, v), (_, op) in zip(items, items[1:]) if k == "ident" and op in ("=", "!=", "=~", "!~")}


def _walk(seq, query: Query) -> set[str]:
    """Returns the metric names under `seq`, recording selectors and grouping clauses."""
    metrics, matching_labels = set(), []
    i = 0
    while i < len(seq):
        kind, value = seq[i]
        nxt = seq[i + 1] if i + 1 < len(seq) else (None, None)
        if kind == "ident" and value in AGGREGATIONS and nxt[0] in ("(", "ident"):
            labels, j = set(), i + 1
            if seq[j][0] == "ident" and seq[j][1] in GROUPING:
                labels |= _names(seq[j + 1])
                j += 2
            body = seq[j]
            j += 1
            if j < len(seq) and seq[j][0] == "ident" and seq[j][1] in GROUPING:
                labels |= _names(seq[j + 1])
                j += 2
            if query.output_labels is None:
                query.output_labels = set(labels)
            inner = _walk(body[1], query)
            query.groupings.append((labels, inner))
            metrics |= inner
            i = j
        elif kind == "ident" and value in VECTOR_MATCHING:
            if nxt[0] == "(":
                matching_labels.append(_names(nxt))
                i += 1
            i += 1
        elif kind == "ident" and value in KEYWORDS:
            i += 1
        elif kind == "ident" and nxt[0] == "(":  # function call
            metrics |= _walk(nxt[1], query)
            i += 2
        elif kind == "ident":  # a selector
            labels = set()
            if nxt[0] == "{":
                labels = _matcher_labels(nxt)
                i += 1
            query.selectors.append((value, labels))
            metrics.add(value)
            i += 1
        elif kind == "{":
            query.errors.append("selector without a metric name")
            i += 1
        elif kind == "(":
            metrics |= _walk(value, query)
            i += 1
        else:
            i += 1
    query.groupings += [(labels, set(metrics)) for labels in matching_labels]
    return metrics


# --- what the catalogue exports ---------------------------------------------------------------------

def catalogue_labels() -> dict[str, set[str]]:
    """Exported series name -> its labels."""
    out = {"up": set(UP_LABELS)}
    for spec in CATALOGUE:
        base = set(LABELS) | set(spec.labels)
        if spec.kind == "histogram":
            out |= {spec.full_name + "_bucket": base | {"le"}, spec.full_name + "_sum": base,
                    spec.full_name + "_count": base}
        else:
            out[spec.full_name] = base
    assert set(out) == all_series() | {"up"}
    return out


def problems(expr: str, known: dict[str, set[str]]) -> list[str]:
    query = parse(expr)
    found = list(query.errors)
    for metric, labels in query.selectors:
        if metric not in known:
            found.append(f"unknown series {metric}")
        elif labels - known[metric] - {"__name__"}:
            found.append(f"{metric} has no label(s) {sorted(labels - known[metric])}")
    for labels, scope in query.groupings:
        available = set().union(*(known.get(m, set()) for m in scope))
        if labels - available:
            found.append(f"grouping by {sorted(labels - available)}: not a label of {sorted(scope)}")
    return [f"{p} in {expr!r}" for p in found]


def output_labels(expr: str, known: dict[str, set[str]]) -> set[str]:
    """Labels a rule's result keeps: its outermost aggregation's `by`, else its inputs' labels."""
    query = parse(expr)
    if query.output_labels is not None:
        return query.output_labels - {"le"}
    return set().union(*(known.get(m, set()) for m, _ in query.selectors)) - {"le"}


def test_the_reader_catches_unknown_series_and_labels():
    known = catalogue_labels()
    assert problems('sum by (role) (rate(pdserve:prompt_tokens_total{node="a"}[5m]))', known) == []
    assert problems("rate(pdserve:prompt_tokens[5m])", known)  # the name without _total
    assert problems('pdserve:prompt_tokens_total{rank="0"}', known)
    assert problems("sum by (rank) (rate(pdserve:prompt_tokens_total[5m]))", known)
    assert problems("sum(rate(pdserve:prompt_tokens_total[5m])) by (layer)", known)
    assert problems("histogram_quantile(0.9, sum by (le) (rate(pdserve:time_to_first_token_seconds_count[5m])))",
                    known)
    assert problems('{__name__="up"}', known)
    assert output_labels("histogram_quantile(0.9, sum by (le, model) (rate(pdserve:time_to_first_token_seconds_bucket"
                         "[5m])))", known) == {"model"}


# --- the dashboard ------------------------------------------------------------------------------------

def load_builder():
    spec = importlib.util.spec_from_file_location("build_dashboard", GRAFANA / "build_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((GRAFANA / "pdserve.json").read_text())


def all_panels(dashboard: dict) -> list[dict]:
    return [p for top in dashboard["panels"] for p in [top, *top.get("panels", [])]]


def panel_exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in all_panels(dashboard) for t in p.get("targets", [])]


def variable_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(inner expression, label) of every label_values(...) variable."""
    out = []
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", var["query"]["query"])
            assert m, f"variable {var['name']}: expected label_values(series, label)"
            out.append((m.group(1), m.group(2)))
    return out


def test_committed_dashboard_is_the_builder_output():
    builder = load_builder()
    assert (GRAFANA / "pdserve.json").read_text() == builder.render(builder.build()), \
        "deploy/grafana/pdserve.json is stale: run python deploy/grafana/build_dashboard.py"


def test_dashboard_queries_name_only_exported_series_and_their_labels(dashboard):
    known = catalogue_labels()
    exprs = panel_exprs(dashboard)
    assert len(exprs) > 30
    found = [p for e in exprs for p in problems(e, known)]
    for expr, label in variable_queries(dashboard):
        found += problems(expr, known)
        found += [f"label_values label {label!r} not on {m}" for m, _ in parse(expr).selectors
                  if label not in known.get(m, set())]
    assert found == []


def test_every_catalogue_metric_has_a_panel(dashboard):
    shown = {m for e in panel_exprs(dashboard) for m, _ in parse(e).selectors}
    missing = [spec.full_name for spec in CATALOGUE
               if spec.full_name not in NOT_ON_DASHBOARD
               and not shown & {spec.full_name + s for s in ("", "_bucket", "_sum", "_count")}]
    assert missing == []


def test_dashboard_variables(dashboard):
    assert dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("model", "role", "node"):
        assert variables[name]["type"] == "query"
        assert re.fullmatch(rf"label_values\(.*,\s*{name}\)", variables[name]["query"]["query"])
    used = {v for e in panel_exprs(dashboard) + [e for e, _ in variable_queries(dashboard)]
            for v in grafana_variables(e)}
    assert used - set(variables) - GRAFANA_BUILTINS == set()
    assert {"model", "role", "node", "ttft_slo_ms", "tpot_slo_ms", "itl_slo_ms"} <= used
    for p in all_panels(dashboard):
        assert p.get("datasource", {"uid": "${datasource}"})["uid"] == "${datasource}", p["title"]


@pytest.mark.parametrize("name, default_ms", [("ttft_slo_ms", "1000"), ("tpot_slo_ms", "50"), ("itl_slo_ms", "50")])
def test_slo_variables_select_a_bucket_the_processes_export(dashboard, name, default_ms):
    """Text is the target in ms; the value, put into `le=~"V|V.0"`, must match the `le` text of
    that bucket as prometheus_client writes it and as Prometheus 3 normalizes it."""
    var = next(v for v in dashboard["templating"]["list"] if v["name"] == name)
    assert var["type"] in ("custom", "textbox")
    assert var["current"]["text"] == default_ms
    exported = exported_le_texts("time_to_first_token_seconds")
    for option in var["options"]:
        seconds = float(option["value"])
        assert seconds in LATENCY_BUCKETS and float(option["text"]) == pytest.approx(seconds * 1000)
        pattern = f"{option['value']}|{option['value']}.0"
        assert [le for le in exported if re.fullmatch(pattern, le)] == [exported_text(seconds)]
        assert re.fullmatch(pattern, go_float_text(seconds))
    assert any(f"le=~\"${{{name}}}|${{{name}}}.0\"" in e for e in panel_exprs(dashboard))


def test_panels_do_not_overlap(dashboard):
    cells = {}
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids))
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


# --- the rules --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_rule_queries_name_only_exported_or_recorded_series_and_their_labels(rules):
    known = catalogue_labels()
    found = []
    for rule in rules:  # a recorded series may be used only after (below) its rule
        found += problems(rule["expr"], known)
        if "record" in rule:
            assert rule["record"] not in known, f"{rule['record']} shadows an exported series"
            known[rule["record"]] = output_labels(rule["expr"], known) | set(rule.get("labels", {}))
    assert found == []
    assert any("alert" in r for r in rules) and any("record" in r for r in rules)


def test_alert_annotations_use_labels_the_alert_has(rules):
    known = catalogue_labels()
    for rule in rules:
        if "record" in rule:
            known[rule["record"]] = output_labels(rule["expr"], known) | set(rule.get("labels", {}))
            continue
        has = output_labels(rule["expr"], known) | set(rule.get("labels", {}))
        used = {m for text in rule.get("annotations", {}).values() for m in re.findall(r"\$labels\.(\w+)", text)}
        assert used <= has, f"{rule['alert']}: {sorted(used - has)} not on its series"


def exported_text(value: float) -> str:
    """How one bucket bound appears in the `le` label of a pdserve process's /metrics."""
    return next(le for le in exported_le_texts("time_to_first_token_seconds") if float(le) == value)


def go_float_text(value: float) -> str:
    """The `le` text after Prometheus 3's normalization (Go's shortest float format)."""
    return repr(value).removesuffix(".0")


def exported_le_texts(metric: str) -> list[str]:
    metrics = ServingMetrics("m", "router", "r0")
    metrics.observe_request(ttft=0.5, e2e=2.0, num_output_tokens=10)
    families = text_string_to_metric_families(generate_latest(metrics.registry).decode())
    return [s.labels["le"] for f in families for s in f.samples if s.name == f"pdserve:{metric}_bucket"]


@pytest.mark.parametrize("slo, metric, target", [("ttft", "time_to_first_token_seconds", 1.0),
                                                  ("tpot", "request_time_per_output_token_seconds", 0.05)])
def test_slo_rules_read_the_target_bucket(rules, slo, metric, target):
    """Each attainment ratio divides the bucket at the target by the count, on the router, for the
    windows the burn-rate alerts use; its `le` matcher picks exactly the target's bucket."""
    assert target in BY_NAME[f"pdserve:{metric}"].buckets
    ratios = {r["record"]: r["expr"] for r in rules if r.get("record", "").startswith(f"pdserve:{slo}_slo_attainment:")}
    windows = {name.rsplit("_", 1)[1] for name in ratios}
    assert windows == {"5m", "30m", "1h", "2h", "6h", "1d", "3d"}
    exported = exported_le_texts(metric)
    for name, expr in ratios.items():
        (op, pattern), = re.findall(r'\ble(=~|=)"([^"]*)"', expr)
        fits = (lambda le: re.fullmatch(pattern, le)) if op == "=~" else (lambda le: le == pattern)
        assert [le for le in exported if fits(le)] == [exported_text(target)], name
        assert fits(go_float_text(target)), name
        assert f'pdserve:{metric}_count{{role="router"}}' in expr and 'role="router"' in expr.split("/")[0], name


# --- promtool ---------------------------------------------------------------------------------------

def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_accepts_the_rules():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_rule_unit_tests_pass():
    """Burn-rate alerts fire at high error rates, stop paging after recovery, stay quiet at low ones."""
    result = promtool("test", "rules", RULES_UNIT_TEST.name, cwd=RULES_UNIT_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def example_targets() -> list[dict]:
    """The targets.json format documented in prometheus.yml."""
    return [{"targets": ["127.0.0.1:8000"], "labels": {"role": "router", "node": "router-0"}},
            {"targets": ["127.0.0.1:9101"], "labels": {"role": "prefill", "node": "prefill-0"}},
            {"targets": ["127.0.0.1:9201"], "labels": {"role": "decode", "node": "decode-0"}}]


@needs_promtool
def test_promtool_accepts_the_config_and_the_targets_file(tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    assert config["global"]["scrape_interval"] == "5s"
    (job,) = config["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == ["targets.json"] and job["honor_labels"] is True
    assert config["rule_files"] == [RULES.name]
    assert f'up{{job="{job["job_name"]}"}}' in RULES.read_text()

    result = promtool("check", "config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr

    for path in (CONFIG, RULES):
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "targets.json").write_text(json.dumps(example_targets()))
    result = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0 and "WARNING" not in result.stdout + result.stderr, result.stdout + result.stderr

    (tmp_path / "targets.json").write_text(json.dumps([{"targets": "127.0.0.1:8000"}]))  # not a list
    assert promtool("check", "config", "prometheus.yml", cwd=tmp_path).returncode != 0
