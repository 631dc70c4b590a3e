#!/usr/bin/env python3
"""Check that a Grafana dashboard queries only metrics (and labels) the daemon defines.

    check_dashboard.py DASHBOARD.json src/ops/metrics.rs            exit 0 if clean, 1 if not
    check_dashboard.py --self-test DASHBOARD.json src/ops/metrics.rs

Source of truth: the Rust sources, not a live /metrics (no daemon runs here).
From src/ops/metrics.rs it reads the registry prefix (`Registry::with_prefix`),
every `registry.register("name", "help", m.field.clone())`, the type of each
field in `struct Metrics` (Counter, Gauge, Histogram, with or without a
`Family<Labels, ...>`) and the fields of each `...Labels` struct. That gives
the series names the OpenMetrics text encoder (prometheus-client) writes:
counters `<prefix>_<name>_total`, histograms `_bucket` (with `le`), `_sum` and
`_count`, gauges `<prefix>_<name>`, and their label names.

Every PromQL expression in the dashboard (panels, nested row panels, and
templating queries) is scanned for `gar_restarter_*` names; each must be a
series above, each label in a `{...}` matcher on it must be one of its labels
(or a scrape target label), and each label in `by (...)`/`without (...)` must
be a label of some metric in that expression (or a target label). The
dashboard must also have panels for events, restarts, dead letters, latency
and index freshness, and query at least 10 distinct metrics.
"""

from __future__ import annotations

import copy
import json
import re
import sys

# Labels Prometheus adds when scraping (Prometheus Operator's defaults).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint"}
REQUIRED_PANELS = ("events", "restart", "dead", "latency", "index")
MIN_METRICS = 10


def defined_series(rust: str) -> dict[str, set[str]]:
    m = re.search(r'Registry::with_prefix\("([a-z_]+)"\)', rust)
    if not m:
        raise ValueError("no Registry::with_prefix(\"...\") in the metrics source")
    prefix = m.group(1)
    labels: dict[str, set[str]] = {}
    for name, body in re.findall(r"pub struct (\w+Labels)\s*\{([^}]*)\}", rust):
        labels[name] = set(re.findall(r"pub (\w+)\s*:", body))
    struct = re.search(r"pub struct Metrics\s*\{(.*?)\n\}", rust, re.S)
    if not struct:
        raise ValueError("no `pub struct Metrics { ... }` in the metrics source")
    fields: dict[str, tuple[str, set[str]]] = {}
    for field, ty in re.findall(r"^\s*(?:pub\s+)?(\w+)\s*:\s*([^\n]+?),?\s*$", struct.group(1), re.M):
        fam = re.match(r"Family<\s*(\w+)\s*,\s*(\w+)", ty)
        if fam:
            fields[field] = (fam.group(2), labels.get(fam.group(1), set()))
        else:
            fields[field] = (re.match(r"(\w+)", ty).group(1), set())
    series: dict[str, set[str]] = {}
    regs = re.findall(r'registry\.register\(\s*"([a-z0-9_]+)"\s*,\s*"[^"]*"\s*,\s*m\.(\w+)\.clone\(\)', rust)
    if not regs:
        raise ValueError("no registry.register(\"name\", \"help\", m.field.clone()) calls found")
    for name, field in regs:
        if field not in fields:
            raise ValueError(f"metric {name}: field {field} not in struct Metrics")
        kind, lbls = fields[field]
        base = f"{prefix}_{name}"
        if kind == "Counter":
            series[f"{base}_total"] = set(lbls)
        elif kind == "Gauge":
            series[base] = set(lbls)
        elif kind == "Histogram":
            series[f"{base}_bucket"] = set(lbls) | {"le"}
            series[f"{base}_sum"] = set(lbls)
            series[f"{base}_count"] = set(lbls)
        else:
            raise ValueError(f"metric {name}: unknown metric type {kind}")
    return series


def queries(dash: dict) -> list[tuple[str, str]]:
    out = []

    def walk(panels):
        for p in panels or []:
            for t in p.get("targets") or []:
                if t.get("expr"):
                    out.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels"))

    walk(dash.get("panels"))
    for v in (dash.get("templating") or {}).get("list") or []:
        q = v.get("query")
        if v.get("type") == "query":
            q = q.get("query") if isinstance(q, dict) else q
            if q:
                out.append((f"variable {v.get('name')}", q))
    return out


def check(dash: dict, series: dict[str, set[str]]) -> list[str]:
    errors = []
    used = set()
    for title, expr in queries(dash):
        names = re.findall(r"\bgar_restarter_[a-z0-9_]+", expr)
        if not names:
            errors.append(f"{title}: query names no gar_restarter_ metric: {expr}")
        expr_labels = set()
        for n in names:
            if n not in series:
                errors.append(f"{title}: {n} is not a metric the daemon defines")
                continue
            used.add(n)
            expr_labels |= series[n]
        for n, matchers in re.findall(r"\b(gar_restarter_[a-z0-9_]+)\{([^}]*)\}", expr):
            for lbl in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers):
                if n in series and lbl not in series[n] | TARGET_LABELS:
                    errors.append(f"{title}: {n} has no label {lbl!r} (has {sorted(series[n])})")
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for lbl in (x.strip() for x in group.split(",") if x.strip()):
                if lbl not in expr_labels | TARGET_LABELS:
                    errors.append(f"{title}: grouping label {lbl!r} is on none of the metrics in {expr}")
    titles = " ".join(p.get("title", "").lower() for p in dash.get("panels") or [])
    for word in REQUIRED_PANELS:
        if word not in titles:
            errors.append(f"no panel about {word!r} (titles: {titles})")
    if len(used) < MIN_METRICS:
        errors.append(f"only {len(used)} distinct daemon metrics queried, expected at least {MIN_METRICS}")
    return errors


def first_target(dash):
    for p in dash["panels"]:
        for t in p.get("targets") or []:
            return t
    raise LookupError("no target")


MUTANTS = [
    ("unknown metric", lambda d: first_target(d).__setitem__("expr", "rate(gar_restarter_no_such_thing_total[5m])")),
    ("counter without _total", lambda d: first_target(d).__setitem__(
        "expr", "rate(gar_restarter_events_received[5m])")),
    ("histogram queried as a plain name", lambda d: first_target(d).__setitem__(
        "expr", "gar_restarter_lookup_seconds")),
    ("unknown label in a matcher", lambda d: first_target(d).__setitem__(
        "expr", 'rate(gar_restarter_events_received_total{verb="x"}[5m])')),
    ("unknown grouping label", lambda d: first_target(d).__setitem__(
        "expr", "sum by (result) (rate(gar_restarter_events_received_total[5m]))")),
    ("query without a daemon metric", lambda d: first_target(d).__setitem__("expr", "up")),
    ("no dead-letter panel", lambda d: d.__setitem__(
        "panels", [p for p in d["panels"] if "dead" not in p.get("title", "").lower()])),
    ("no panels at all", lambda d: d.__setitem__("panels", [])),
]


def main(argv: list[str]) -> int:
    self_test = argv[:1] == ["--self-test"]
    if self_test:
        argv = argv[1:]
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1])
        return 2
    dash = json.load(open(argv[0], encoding="utf-8"))
    series = defined_series(open(argv[1], encoding="utf-8").read())
    errors = check(dash, series)
    if not self_test:
        for e in errors:
            print(f"{argv[0]}: VIOLATION: {e}")
        if errors:
            return 1
        n = len(queries(dash))
        print(f"dashboard: {n} queries use only the {len(series)} series defined in {argv[1]} (source-based)")
        return 0
    if errors:
        print(f"self-test: the dashboard itself fails: {errors}")
        return 1
    missed = 0
    for name, mutate in MUTANTS:
        bad = copy.deepcopy(dash)
        mutate(bad)
        errs = check(bad, series)
        print(f"self-test: {'ok  ' if errs else 'FAIL'} {name:35s} -> {errs[0][:90] if errs else 'not detected'}")
        missed += not errs
    if missed:
        print(f"self-test: FAILED, {len(MUTANTS) - missed}/{len(MUTANTS)} bad dashboards rejected")
        return 1
    print(f"all {len(MUTANTS)} bad dashboards rejected")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
