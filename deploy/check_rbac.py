#!/usr/bin/env python3
"""Policy checks on rendered gar-restarter manifests (`kubectl kustomize` output).

    check_rbac.py RENDERED.yaml [...]     exit 0 if clean, 1 on any violation
    check_rbac.py --self-test RENDERED.yaml
                                          mutates a known-good render in many
                                          bad ways and expects each mutant to
                                          be rejected (exit 1) by a separate
                                          run of this script; exit 0 if all are

What is enforced (the contract the deploy/ manifests promise):

RBAC - the only grants bound to the gar-restarter ServiceAccount are
  * apps deployments/statefulsets/daemonsets: verbs exactly
    get, list, watch, patch - either cluster-wide (ClusterRole +
    ClusterRoleBinding) or per namespace (Role + RoleBinding), and then the
    set of namespaces must equal the daemon's --namespace args;
  * events.k8s.io events: verbs exactly create, patch (the Kubernetes Events
    on restarted workloads, written in the workloads' namespaces), granted in
    exactly the scopes of the workload grant (the same ClusterRole or Roles);
  * configmaps in the daemon's namespace: get, update only with
    resourceNames exactly gar-restarter-cache and its shards
    gar-restarter-cache-0 ... -7 (codec::MAX_SHARDS = 8), and create (never
    restrictable by resourceNames);
  nothing else: no wildcards, no other resources or subresources, no
  nonResourceURLs, no aggregation, no binding to a role not in the render,
  no subject other than the gar-restarter ServiceAccount, no unbound role.

Pod - for the gar-restarter Deployment:
  * every container: runAsNonRoot true, runAsUser 65532 (container or pod
    level), readOnlyRootFilesystem true, allowPrivilegeEscalation false,
    capabilities drop [ALL] and add nothing, seccompProfile RuntimeDefault,
    not privileged;
  * --cache-configmap (if given) names gar-restarter-cache in the pod's
    namespace;
  * the cache volume is one projected volume whose sources are exactly the
    ConfigMaps gar-restarter-cache and gar-restarter-cache-0 ... -7, each
    optional, without items, and nothing else; it is mounted read-only at the
    cache dir without subPath/subPathExpr, and no other volume references
    those ConfigMaps.

Optional objects, when present in the render:
  * ServiceMonitor / PodMonitor (Prometheus Operator): in the daemon's
    namespace, selecting the metrics Service / the daemon pods, scraping the
    port named metrics at /metrics;
  * NetworkPolicy gar-restarter: selects the daemon pods, types Ingress and
    Egress, ingress only to TCP 9090, egress only to 53 (UDP/TCP), 443, 6443,
    4317 and 4318;
  * ValidatingAdmissionPolicy (+ binding, validationActions [Deny],
    failurePolicy Fail): its variables and validations are exactly those of
    deploy/components/admission-policy/policy.yaml, and its matchCondition
    matches the daemon's ServiceAccount (exactly, or any SA named
    gar-restarter).

`check_rbac.py --expect-namespace NS FILE` also checks that the daemon runs in
NS: every namespaced object is in NS (except the per-namespace workload
Roles/RoleBindings, which must be in the --namespace list), every binding
subject is NS/gar-restarter, any Namespace object is NS, and no string in the
render names a Service in the namespace gar-restarter (`*.gar-restarter.svc`)
unless NS is gar-restarter.

`check_rbac.py --codec src/index/cache/codec.rs` checks that MAX_SHARDS there is
the shard count assumed here.
  * terminationGracePeriodSeconds > --shutdown-timeout (default 20s);
  * probes /healthz and /readyz on the port named metrics (9090), POD_NAMESPACE
    from the downward API, resource requests and a memory limit;
  * the ServiceAccount carries the Workload Identity annotation unless the
    daemon talks to the Pub/Sub emulator (PUBSUB_EMULATOR_HOST).
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Callable

import yaml

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - older Pythons
    tomllib = None  # type: ignore[assignment]

APP = "gar-restarter"
SERVICE_ACCOUNT = "gar-restarter"
CACHE_CONFIGMAP = "gar-restarter-cache"
# codec::MAX_SHARDS in src/index/cache/codec.rs: the sharded cache form splits the
# index over CACHE_CONFIGMAP-0 ... -(N-1). RBAC resourceNames cannot be
# wildcarded, so every name is listed (and checked) explicitly.
CACHE_MAX_SHARDS = 8
CACHE_SHARD_CONFIGMAPS = tuple(f"{CACHE_CONFIGMAP}-{i}" for i in range(CACHE_MAX_SHARDS))
CACHE_CONFIGMAPS = (CACHE_CONFIGMAP, *CACHE_SHARD_CONFIGMAPS)
WORKLOAD_GROUP = "apps"
WORKLOAD_RESOURCES = frozenset({"deployments", "statefulsets", "daemonsets"})
WORKLOAD_VERBS = frozenset({"get", "list", "watch", "patch"})
CACHE_NAMED_VERBS = frozenset({"get", "update"})
CACHE_CREATE_VERBS = frozenset({"create"})
EVENTS_GROUP = "events.k8s.io"
EVENTS_VERBS = frozenset({"create", "patch"})
RUN_AS_USER = 65532
METRICS_PORT = 9090
DEFAULT_SHUTDOWN_TIMEOUT_S = 20.0
DEFAULT_CACHE_DIR = "/etc/cache"
WI_ANNOTATION = "iam.gke.io/gcp-service-account"
METRICS_SERVICE = "gar-restarter-metrics"

Doc = dict[str, Any]

# libyaml bindings when PyYAML has them (its wheels do): ~10x faster.
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def load_docs(path: str) -> list[Doc]:
    with open(path, encoding="utf-8") as fh:
        docs = [d for d in yaml.load_all(fh, Loader=Loader) if d]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d:
            raise ValueError(f"{path}: not a Kubernetes object: {d!r:.80}")
    return docs


def meta(doc: Doc) -> Doc:
    return doc.get("metadata") or {}


def ident(doc: Doc) -> str:
    ns = meta(doc).get("namespace")
    return f"{doc['kind']}/{ns + '/' if ns else ''}{meta(doc).get('name')}"


def parse_duration(text: str) -> float:
    """'20s', '1m30s', '500ms', '2h', or bare seconds -> seconds."""
    text = str(text).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    units = {"ms": 0.001, "s": 1, "sec": 1, "secs": 1, "m": 60, "min": 60, "mins": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise ValueError(f"cannot parse duration {text!r}")
    total = 0.0
    for num, unit in parts:
        if unit not in units:
            raise ValueError(f"unknown duration unit {unit!r} in {text!r}")
        total += float(num) * units[unit]
    return total


def arg_values(args: list[str], flag: str) -> list[str]:
    """Values of `--flag=v` and `--flag v` in a container's args."""
    out = []
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            out.append(a[len(flag) + 1 :])
        elif a == flag and i + 1 < len(args):
            out.append(args[i + 1])
    return out


class Checker:
    def __init__(self, docs: list[Doc], expect_ns: str | None = None):
        self.docs = docs
        self.errors: list[str] = []
        self.expect_ns = expect_ns

    def fail(self, msg: str) -> None:
        self.errors.append(msg)

    def of_kind(self, *kinds: str) -> list[Doc]:
        return [d for d in self.docs if d.get("kind") in kinds]

    # ------------------------------------------------------------------ #
    def run(self) -> list[str]:
        deployments = [d for d in self.of_kind("Deployment") if meta(d).get("name") == APP]
        if len(deployments) != 1:
            self.fail(f"expected exactly one Deployment named {APP}, found {len(deployments)}")
            return self.errors
        dep = deployments[0]
        self.ns = meta(dep).get("namespace")
        if not self.ns:
            self.fail(f"Deployment {APP} has no namespace")
        self.pod = ((dep.get("spec") or {}).get("template") or {}).get("spec") or {}
        mains = [c for c in self.pod.get("containers") or [] if c.get("name") == APP]
        if len(mains) != 1:
            self.fail(f"Deployment {APP}: expected one container named {APP}")
            return self.errors
        self.main = mains[0]
        self.args = [str(a) for a in self.main.get("args") or []]
        self.env = {e.get("name"): e for e in self.main.get("env") or []}
        self.config = self.load_config_toml()

        self.check_rbac()
        self.check_security_context()
        self.check_cache_volume()
        self.check_shutdown()
        self.check_probes_and_env()
        self.check_service_account()
        self.check_monitors()
        self.check_network_policy()
        self.check_admission_policy()
        if self.expect_ns is not None:
            self.check_namespace(self.expect_ns)
        return self.errors

    # ------------------------------------------------------------------ #
    def option(self, flag: str) -> str | None:
        """Effective value of a daemon option: args, then env, then config file."""
        vals = arg_values(self.args, "--" + flag)
        if vals:
            return vals[-1]
        env = self.env.get("GAR_RESTARTER_" + flag.upper().replace("-", "_"))
        if env is not None and "value" in env:
            return str(env["value"])
        if flag in self.config:
            return str(self.config[flag])
        return None

    def load_config_toml(self) -> dict[str, Any]:
        paths = arg_values(self.args, "--config")
        env = self.env.get("GAR_RESTARTER_CONFIG")
        if not paths and env is not None and "value" in env:
            paths = [env["value"]]
        if not paths:
            return {}
        path = paths[-1]
        mount = next(
            (m for m in self.main.get("volumeMounts") or [] if path.startswith(m.get("mountPath", "").rstrip("/") + "/")),
            None,
        )
        if mount is None:
            self.fail(f"--config {path} is not inside any volumeMount of the {APP} container")
            return {}
        vol = next((v for v in self.pod.get("volumes") or [] if v.get("name") == mount.get("name")), None)
        cm_name = ((vol or {}).get("configMap") or {}).get("name")
        if not cm_name:
            return {}  # not a ConfigMap volume; nothing to read statically
        rel = path[len(mount["mountPath"].rstrip("/")) + 1 :]
        items = (vol.get("configMap") or {}).get("items")
        key = next((i["key"] for i in items if i.get("path") == rel), None) if items else rel
        cms = [c for c in self.of_kind("ConfigMap") if meta(c).get("name") == cm_name]
        if not cms:
            self.fail(f"config ConfigMap {cm_name} (for --config {path}) is not in the render")
            return {}
        text = (cms[0].get("data") or {}).get(key)
        if text is None:
            self.fail(f"ConfigMap {cm_name} has no key {key!r} for --config {path}")
            return {}
        if tomllib is None:
            return {}
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            self.fail(f"ConfigMap {cm_name} key {key}: invalid TOML: {exc}")
            return {}

    # ------------------------------------------------------------------ #
    def check_rbac(self) -> None:
        roles = {}
        for r in self.of_kind("Role", "ClusterRole"):
            roles[(r["kind"], meta(r).get("namespace") if r["kind"] == "Role" else None, meta(r).get("name"))] = r
            if r.get("aggregationRule"):
                self.fail(f"{ident(r)}: aggregationRule is not allowed (grants become implicit)")

        bound: set[tuple] = set()
        # grants[scope] -> list of (rule, source); scope is "*cluster*" or a namespace
        workload_scopes: dict[str, set[str]] = {}
        cache_named: set[str] = set()
        cache_create: set[str] = set()
        self.event_scopes: set[str] = set()

        for b in self.of_kind("RoleBinding", "ClusterRoleBinding"):
            subjects = b.get("subjects") or []
            ours = [
                s
                for s in subjects
                if s.get("kind") == "ServiceAccount" and s.get("name") == SERVICE_ACCOUNT and s.get("namespace") == self.ns
            ]
            if not ours or len(ours) != len(subjects):
                self.fail(
                    f"{ident(b)}: subjects must be exactly ServiceAccount {self.ns}/{SERVICE_ACCOUNT}, got {subjects}"
                )
            ref = b.get("roleRef") or {}
            if ref.get("kind") == "Role":
                if b["kind"] != "RoleBinding":
                    self.fail(f"{ident(b)}: a ClusterRoleBinding cannot reference a Role")
                    continue
                key = ("Role", meta(b).get("namespace"), ref.get("name"))
            else:
                key = ("ClusterRole", None, ref.get("name"))
            role = roles.get(key)
            if role is None:
                self.fail(f"{ident(b)}: binds {key[0]} {ref.get('name')!r}, which is not part of the render")
                continue
            bound.add(key)
            scope = "*cluster*" if b["kind"] == "ClusterRoleBinding" else meta(b).get("namespace")
            for i, rule in enumerate(role.get("rules") or []):
                self.check_rule(role, i, rule, scope, workload_scopes, cache_named, cache_create)

        for key, role in roles.items():
            if key not in bound:
                self.fail(f"{ident(role)}: role is not bound to {SERVICE_ACCOUNT} (remove it)")

        # Coverage: each scope must grant all three workload kinds.
        for scope, res in sorted(workload_scopes.items()):
            missing = WORKLOAD_RESOURCES - res
            if missing:
                self.fail(f"workload grant in {scope}: missing resources {sorted(missing)}")
        namespaces = sorted(arg_values(self.args, "--namespace"))
        if not workload_scopes:
            self.fail("no grant on apps deployments/statefulsets/daemonsets: the daemon cannot work")
        elif "*cluster*" in workload_scopes:
            if len(workload_scopes) > 1:
                self.fail(f"workload grants are both cluster-wide and per namespace: {sorted(workload_scopes)}")
            if namespaces:
                self.fail(
                    f"--namespace {namespaces} with a cluster-wide ClusterRole: use per-namespace Roles "
                    "(deploy/overlays/namespaced) for least privilege"
                )
        else:
            if sorted(workload_scopes) != namespaces:
                self.fail(
                    f"per-namespace workload Roles in {sorted(workload_scopes)} but the daemon watches "
                    f"--namespace {namespaces or '(all namespaces)'}; they must match"
                )

        if workload_scopes and self.event_scopes != set(workload_scopes):
            self.fail(
                f"events.k8s.io events create/patch granted in {sorted(self.event_scopes)} but the "
                f"workloads in {sorted(workload_scopes)}: Events are written where the workloads are"
            )
        if self.ns not in cache_named:
            self.fail(
                f"missing get/update on configmaps {CACHE_CONFIGMAP} and {CACHE_CONFIGMAP}-0..{CACHE_MAX_SHARDS - 1} "
                f"in namespace {self.ns}"
            )
        if self.ns not in cache_create:
            self.fail(f"missing create on configmaps in namespace {self.ns}")

    def check_rule(self, role, i, rule, scope, workload_scopes, cache_named, cache_create) -> None:
        where = f"{ident(role)} rule {i}"
        if rule.get("nonResourceURLs"):
            self.fail(f"{where}: nonResourceURLs are not allowed")
            return
        groups = rule.get("apiGroups") or []
        resources = rule.get("resources") or []
        verbs = rule.get("verbs") or []
        names = rule.get("resourceNames") or []
        if len(set(verbs)) != len(verbs) or len(set(resources)) != len(resources):
            self.fail(f"{where}: duplicate verbs/resources")
        if "*" in groups or "*" in resources or "*" in verbs:
            self.fail(f"{where}: wildcards are not allowed ({groups} {resources} {verbs})")
            return
        if any("/" in r for r in resources):
            self.fail(f"{where}: subresources are not allowed: {resources}")
            return
        vset, rset = frozenset(verbs), frozenset(resources)

        if groups == [WORKLOAD_GROUP]:
            if not rset or not rset <= WORKLOAD_RESOURCES:
                self.fail(f"{where}: apps resources must be within {sorted(WORKLOAD_RESOURCES)}, got {resources}")
                return
            if vset != WORKLOAD_VERBS:
                self.fail(f"{where}: workload verbs must be exactly {sorted(WORKLOAD_VERBS)}, got {verbs}")
                return
            if names:
                self.fail(f"{where}: workload rules must not use resourceNames (list/watch cannot honour them)")
                return
            workload_scopes.setdefault(scope, set()).update(rset)
        elif groups == [""]:
            if rset != {"configmaps"}:
                self.fail(f"{where}: core-group resources other than configmaps are not allowed: {resources}")
                return
            if scope != self.ns:
                self.fail(f"{where}: configmap access must be a Role in {self.ns}, not {scope}")
                return
            if vset == CACHE_NAMED_VERBS and names:
                extra = sorted(set(names) - set(CACHE_CONFIGMAPS))
                missing = [n for n in CACHE_CONFIGMAPS if n not in names]
                if extra or missing or len(set(names)) != len(names):
                    self.fail(
                        f"{where}: get/update resourceNames must be exactly {CACHE_CONFIGMAP} and "
                        f"{CACHE_CONFIGMAP}-0..{CACHE_MAX_SHARDS - 1} (codec::MAX_SHARDS = {CACHE_MAX_SHARDS}); "
                        f"not allowed: {extra}, missing: {missing}"
                        + (", duplicates" if len(set(names)) != len(names) else "")
                    )
                else:
                    cache_named.add(scope)
            elif vset == CACHE_CREATE_VERBS and not names:
                cache_create.add(scope)
            else:
                self.fail(
                    f"{where}: configmaps allow only get/update with resourceNames {CACHE_CONFIGMAP} and "
                    f"{CACHE_CONFIGMAP}-0..{CACHE_MAX_SHARDS - 1}, or create without resourceNames, "
                    f"got verbs {verbs} resourceNames {names}"
                )
        elif groups == [EVENTS_GROUP]:
            if rset != {"events"}:
                self.fail(f"{where}: {EVENTS_GROUP} resources other than events are not allowed: {resources}")
                return
            if vset != EVENTS_VERBS:
                self.fail(f"{where}: event verbs must be exactly {sorted(EVENTS_VERBS)}, got {verbs}")
                return
            if names:
                self.fail(f"{where}: event rules must not use resourceNames (Event names are generated)")
                return
            self.event_scopes.add(scope)
        else:
            self.fail(f"{where}: apiGroups {groups} are not allowed")

    # ------------------------------------------------------------------ #
    def check_security_context(self) -> None:
        psc = self.pod.get("securityContext") or {}
        containers = (self.pod.get("initContainers") or []) + (self.pod.get("containers") or [])
        for c in containers:
            where = f"Deployment {APP} container {c.get('name')}"
            sc = c.get("securityContext") or {}

            def eff(key, sc=sc):
                return sc[key] if key in sc else psc.get(key)

            if eff("runAsNonRoot") is not True:
                self.fail(f"{where}: runAsNonRoot must be true")
            if eff("runAsUser") != RUN_AS_USER:
                self.fail(f"{where}: runAsUser must be {RUN_AS_USER}, got {eff('runAsUser')}")
            if sc.get("readOnlyRootFilesystem") is not True:
                self.fail(f"{where}: readOnlyRootFilesystem must be true")
            if sc.get("allowPrivilegeEscalation") is not False:
                self.fail(f"{where}: allowPrivilegeEscalation must be false")
            if sc.get("privileged"):
                self.fail(f"{where}: privileged is not allowed")
            caps = sc.get("capabilities") or {}
            if caps.get("drop") != ["ALL"]:
                self.fail(f"{where}: capabilities.drop must be [ALL], got {caps.get('drop')}")
            if caps.get("add"):
                self.fail(f"{where}: capabilities.add must be empty, got {caps.get('add')}")
            if (eff("seccompProfile") or {}).get("type") != "RuntimeDefault":
                self.fail(f"{where}: seccompProfile.type must be RuntimeDefault, got {eff('seccompProfile')}")
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            if self.pod.get(key):
                self.fail(f"Deployment {APP}: {key} is not allowed")

    def check_cache_volume(self) -> None:
        # --cache-configmap NS/NAME: RBAC and the volume below list NAME and its
        # shards, so the daemon must use exactly that name in its own namespace.
        target = self.option("cache-configmap")
        if target is not None:
            ns, _, name = target.rpartition("/")
            if name != CACHE_CONFIGMAP or ns not in ("", "$(POD_NAMESPACE)", self.ns):
                self.fail(
                    f"container {APP}: --cache-configmap must be $(POD_NAMESPACE)/{CACHE_CONFIGMAP} "
                    f"(RBAC and the cache volume name it and its shards), got {target}"
                )
        vols = self.pod.get("volumes") or []
        wanted = set(CACHE_CONFIGMAPS)
        projected = []
        for v in vols:
            if ((v.get("configMap") or {}).get("name")) in wanted:
                self.fail(
                    f"volume {v.get('name')}: configMap {v['configMap']['name']} must be a source of the one "
                    f"projected cache volume, not a volume of its own (the daemon reads every key from one directory)"
                )
            sources = (v.get("projected") or {}).get("sources") or []
            if any(((src.get("configMap") or {}).get("name")) in wanted for src in sources):
                projected.append(v)
        if len(projected) != 1:
            self.fail(
                f"Deployment {APP}: expected one projected volume with the {CACHE_CONFIGMAP} ConfigMaps, "
                f"found {len(projected)}"
            )
            return
        vol = projected[0]
        where = f"volume {vol.get('name')}"
        names = []
        for src in vol["projected"]["sources"]:
            cm = src.get("configMap")
            if cm is None or len(src) != 1:
                self.fail(f"{where}: only configMap sources are allowed, got {sorted(src)}")
                continue
            name = cm.get("name")
            names.append(name)
            if name not in wanted:
                self.fail(f"{where}: configMap source {name!r} is not {CACHE_CONFIGMAP} or one of its shards")
            if cm.get("optional") is not True:
                self.fail(
                    f"{where}: configMap source {name} must be optional: true (it is absent until the daemon "
                    "writes it, and shards exist only for the sharded form)"
                )
            if cm.get("items"):
                self.fail(f"{where}: configMap source {name}: no items: the daemon reads whatever keys it has")
        missing = [n for n in CACHE_CONFIGMAPS if n not in names]
        if missing:
            self.fail(f"{where}: missing configMap sources {missing}")
        if len(set(names)) != len(names):
            self.fail(f"{where}: duplicate configMap sources {sorted(n for n in set(names) if names.count(n) > 1)}")
        cache_dir = (self.option("cache-dir") or DEFAULT_CACHE_DIR).rstrip("/")
        containers = (self.pod.get("initContainers") or []) + (self.pod.get("containers") or [])
        for c in containers:
            for m in c.get("volumeMounts") or []:
                if m.get("name") == vol.get("name") and (m.get("subPath") or m.get("subPathExpr")):
                    self.fail(
                        f"container {c.get('name')}: mount of the {CACHE_CONFIGMAP} volume uses subPath, "
                        "which never receives updates"
                    )
        mounts = [m for m in self.main.get("volumeMounts") or [] if m.get("name") == vol.get("name")]
        at_dir = [m for m in mounts if m.get("mountPath", "").rstrip("/") == cache_dir]
        if not at_dir:
            self.fail(f"container {APP}: the {CACHE_CONFIGMAP} volume must be mounted at the cache dir {cache_dir}")
        for m in at_dir:
            if m.get("readOnly") is not True:
                self.fail(f"container {APP}: mount of the {CACHE_CONFIGMAP} volume at {cache_dir} must be readOnly: true")

    def check_shutdown(self) -> None:
        raw = self.option("shutdown-timeout")
        try:
            timeout = parse_duration(raw) if raw is not None else DEFAULT_SHUTDOWN_TIMEOUT_S
        except ValueError as exc:
            self.fail(f"--shutdown-timeout: {exc}")
            return
        grace = self.pod.get("terminationGracePeriodSeconds")
        if not isinstance(grace, int):
            self.fail(
                f"terminationGracePeriodSeconds must be set explicitly above the shutdown timeout ({timeout:g}s)"
            )
            return
        floor = max(timeout, DEFAULT_SHUTDOWN_TIMEOUT_S)
        if grace <= floor:
            self.fail(f"terminationGracePeriodSeconds {grace} must be > shutdown timeout {floor:g}s")

    def check_probes_and_env(self) -> None:
        c = self.main
        if not self.args or self.args[0] != "run":
            self.fail(f"container {APP}: args must start with the `run` subcommand, got {self.args[:1]}")
        for flag in ("subscription", "dead-letter-topic"):
            if self.option(flag) is None and not arg_values(self.args, "--" + flag):
                self.fail(f"container {APP}: --{flag} is not set (args, env or config)")
        ports = {p.get("name"): p for p in c.get("ports") or []}
        if (ports.get("metrics") or {}).get("containerPort") != METRICS_PORT:
            self.fail(f"container {APP}: needs port `metrics` = {METRICS_PORT}")
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = (c.get(probe) or {}).get("httpGet") or {}
            if get.get("path") != path or get.get("port") not in ("metrics", METRICS_PORT):
                self.fail(f"container {APP}: {probe} must be httpGet {path} on port metrics, got {get or None}")
        ref = ((self.env.get("POD_NAMESPACE") or {}).get("valueFrom") or {}).get("fieldRef") or {}
        if ref.get("fieldPath") != "metadata.namespace":
            self.fail(f"container {APP}: POD_NAMESPACE must come from fieldRef metadata.namespace")
        res = c.get("resources") or {}
        for kind, key in (("requests", "cpu"), ("requests", "memory"), ("limits", "memory")):
            if not (res.get(kind) or {}).get(key):
                self.fail(f"container {APP}: resources.{kind}.{key} must be set")

    def check_service_account(self) -> None:
        name = self.pod.get("serviceAccountName")
        if name != SERVICE_ACCOUNT:
            self.fail(f"Deployment {APP}: serviceAccountName must be {SERVICE_ACCOUNT}, got {name}")
            return
        sas = [s for s in self.of_kind("ServiceAccount") if meta(s).get("name") == name and meta(s).get("namespace") == self.ns]
        if not sas:
            self.fail(f"ServiceAccount {self.ns}/{name} is not in the render")
            return
        if "PUBSUB_EMULATOR_HOST" in self.env:
            return
        gsa = (meta(sas[0]).get("annotations") or {}).get(WI_ANNOTATION, "")
        if not re.fullmatch(r"[a-z][a-z0-9-]*@[A-Za-z0-9_.:-]+\.iam\.gserviceaccount\.com", gsa):
            self.fail(f"ServiceAccount {name}: needs annotation {WI_ANNOTATION}=NAME@PROJECT.iam.gserviceaccount.com")

    # ------------------------------------------------------------------ #
    def pod_labels(self) -> dict:
        dep = next(d for d in self.of_kind("Deployment") if meta(d).get("name") == APP)
        return ((dep["spec"].get("template") or {}).get("metadata") or {}).get("labels") or {}

    def check_monitors(self) -> None:
        svc = next((s for s in self.of_kind("Service") if meta(s).get("name") == METRICS_SERVICE), None)
        for kind, endpoints_key, target in (
            ("ServiceMonitor", "endpoints", "service"),
            ("PodMonitor", "podMetricsEndpoints", "pod"),
        ):
            for m in self.of_kind(kind):
                where = ident(m)
                spec = m.get("spec") or {}
                if meta(m).get("namespace") != self.ns:
                    self.fail(f"{where}: must be in the daemon's namespace {self.ns}")
                unknown = sorted(set(spec) - {"selector", endpoints_key, "jobLabel", "namespaceSelector"})
                if unknown:
                    self.fail(f"{where}: unexpected spec fields {unknown}")
                sel = (spec.get("selector") or {}).get("matchLabels") or {}
                if target == "service":
                    labels = meta(svc).get("labels") or {} if svc else {}
                    what = f"Service {METRICS_SERVICE}"
                else:
                    labels = self.pod_labels()
                    what = f"the {APP} pods"
                if not sel or any(labels.get(k) != v for k, v in sel.items()):
                    self.fail(f"{where}: selector {sel} does not select {what} (labels {labels})")
                eps = spec.get(endpoints_key) or []
                if not eps:
                    self.fail(f"{where}: no {endpoints_key}")
                for ep in eps:
                    if ep.get("port") != "metrics" or ep.get("path", "/metrics") != "/metrics":
                        self.fail(f"{where}: must scrape port `metrics` at /metrics, got {ep}")
                    extra = sorted(set(ep) - {"port", "path", "scheme", "interval", "scrapeTimeout", "honorLabels"})
                    if extra:
                        self.fail(f"{where}: unexpected endpoint fields {extra}")

    def check_network_policy(self) -> None:
        for np_ in self.of_kind("NetworkPolicy"):
            where = ident(np_)
            spec = np_.get("spec") or {}
            sel = (spec.get("podSelector") or {}).get("matchLabels") or {}
            labels = self.pod_labels()
            if not sel or any(labels.get(k) != v for k, v in sel.items()):
                self.fail(f"{where}: podSelector {sel} does not select the {APP} pods")
            if sorted(spec.get("policyTypes") or []) != ["Egress", "Ingress"]:
                self.fail(f"{where}: policyTypes must be Ingress and Egress, got {spec.get('policyTypes')}")
            ingress = spec.get("ingress") or []
            if not ingress:
                self.fail(f"{where}: no ingress rule: the metrics port would be unreachable")
            for rule in ingress:
                ports = [(p.get("port"), p.get("protocol", "TCP")) for p in rule.get("ports") or []]
                if ports != [(METRICS_PORT, "TCP")] and ports != [("metrics", "TCP")]:
                    self.fail(f"{where}: ingress must allow only TCP {METRICS_PORT}, got {ports or 'all ports'}")
            allowed = {(53, "UDP"), (53, "TCP"), (443, "TCP"), (6443, "TCP"), (4317, "TCP"), (4318, "TCP")}
            seen = set()
            for rule in spec.get("egress") or []:
                ports = [(p.get("port"), p.get("protocol", "TCP")) for p in rule.get("ports") or []]
                if not ports:
                    self.fail(f"{where}: an egress rule without ports allows every port")
                for p in ports:
                    seen.add(p)
                    if p not in allowed:
                        self.fail(f"{where}: egress port {p} is not DNS, the API server, Google APIs or OTLP")
            for need in ((53, "UDP"), (443, "TCP")):
                if need not in seen:
                    self.fail(f"{where}: egress {need} missing (DNS / API server and Google APIs)")

    def check_admission_policy(self) -> None:
        policies = self.of_kind("ValidatingAdmissionPolicy")
        bindings = self.of_kind("ValidatingAdmissionPolicyBinding")
        if not policies and not bindings:
            return
        if len(policies) != 1 or len(bindings) != 1:
            self.fail(f"expected one ValidatingAdmissionPolicy and one binding, got {len(policies)} and {len(bindings)}")
            return
        pol, bnd = policies[0], bindings[0]
        spec = pol.get("spec") or {}
        bspec = bnd.get("spec") or {}
        if bspec.get("policyName") != meta(pol).get("name"):
            self.fail(f"{ident(bnd)}: policyName {bspec.get('policyName')!r} is not {meta(pol).get('name')!r}")
        if bspec.get("validationActions") != ["Deny"]:
            self.fail(f"{ident(bnd)}: validationActions must be [Deny], got {bspec.get('validationActions')}")
        if bspec.get("matchResources") or bspec.get("paramRef"):
            self.fail(f"{ident(bnd)}: must apply everywhere (no matchResources, no paramRef)")
        if spec.get("failurePolicy") != "Fail":
            self.fail(f"{ident(pol)}: failurePolicy must be Fail, got {spec.get('failurePolicy')}")
        conds = spec.get("matchConditions") or []
        exprs = [c.get("expression", "") for c in conds]
        exact = f"request.userInfo.username == 'system:serviceaccount:{self.ns}:{SERVICE_ACCOUNT}'"
        if exprs not in ([exact], [ANY_SA_CONDITION]):
            self.fail(f"{ident(pol)}: matchConditions must match the daemon's ServiceAccount ({exact}), got {exprs}")
        rules = (spec.get("matchConstraints") or {}).get("resourceRules") or []
        covered = {(g, r) for rule in rules for g in rule.get("apiGroups") or [] for r in rule.get("resources") or []
                   if "UPDATE" in (rule.get("operations") or []) or "*" in (rule.get("operations") or [])}
        for res in sorted(WORKLOAD_RESOURCES):
            if ("apps", res) not in covered:
                self.fail(f"{ident(pol)}: does not match UPDATE of apps/{res}")
        canonical = load_canonical_policy()
        if canonical is None:
            self.fail(f"cannot read the canonical policy {CANONICAL_POLICY}")
            return
        cspec = canonical.get("spec") or {}
        for key in ("variables", "validations", "matchConstraints"):
            if spec.get(key) != cspec.get(key):
                self.fail(f"{ident(pol)}: spec.{key} differs from {os.path.relpath(CANONICAL_POLICY)}")

    def check_namespace(self, ns: str) -> None:
        if self.ns != ns:
            self.fail(f"the daemon runs in namespace {self.ns}, expected {ns}")
        watched = set(arg_values(self.args, "--namespace"))
        for d in self.docs:
            kind, m = d.get("kind"), meta(d)
            if kind == "Namespace":
                if m.get("name") != ns:
                    self.fail(f"{ident(d)}: expected the Namespace {ns}")
                continue
            if kind in CLUSTER_SCOPED:
                continue
            where = m.get("namespace")
            if kind in ("Role", "RoleBinding") and m.get("name") == "gar-restarter-workloads":
                if where not in watched:
                    self.fail(f"{ident(d)}: per-namespace workload grant outside the --namespace list {sorted(watched)}")
            elif where != ns:
                self.fail(f"{ident(d)}: in namespace {where!r}, expected {ns}")
            for s in d.get("subjects") or []:
                if s.get("kind") == "ServiceAccount" and s.get("namespace") != ns:
                    self.fail(f"{ident(d)}: subject {s} is not in {ns}")
        for d in self.of_kind("ClusterRoleBinding"):
            for s in d.get("subjects") or []:
                if s.get("namespace") != ns:
                    self.fail(f"{ident(d)}: subject {s} is not in {ns}")
        if ns != "gar-restarter":
            text = yaml.dump_all(self.docs, Dumper=Dumper)
            for hit in sorted(set(re.findall(r"[a-z0-9-]+\.gar-restarter\.svc[a-z0-9.:-]*", text))):
                self.fail(f"{hit}: names a Service in namespace gar-restarter, not {ns}")


CANONICAL_POLICY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "components", "admission-policy", "policy.yaml")
ANY_SA_CONDITION = (
    "request.userInfo.username.startsWith('system:serviceaccount:') && "
    f"request.userInfo.username.endsWith(':{SERVICE_ACCOUNT}')"
)
CLUSTER_SCOPED = frozenset({
    "Namespace", "ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding", "PriorityClass", "CustomResourceDefinition",
})


def load_canonical_policy() -> Doc | None:
    try:
        docs = load_docs(CANONICAL_POLICY)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return next((d for d in docs if d.get("kind") == "ValidatingAdmissionPolicy"), None)


def check_docs(docs: list[Doc], expect_ns: str | None = None) -> list[str]:
    return Checker(docs, expect_ns).run()


# --------------------------------------------------------------------------- #
# self-test: every mutant of a good render must be rejected
# --------------------------------------------------------------------------- #


def _find(docs, kind, pred=lambda d: True):
    for d in docs:
        if d.get("kind") == kind and pred(d):
            return d
    raise LookupError(f"self-test: no {kind} in the render")


def _workload_rule(docs):
    for d in docs:
        if d.get("kind") in ("Role", "ClusterRole"):
            for r in d.get("rules") or []:
                if r.get("apiGroups") == [WORKLOAD_GROUP]:
                    return r
    raise LookupError("self-test: no workload rule")


def _events_rule(docs):
    for d in docs:
        if d.get("kind") in ("Role", "ClusterRole"):
            for r in d.get("rules") or []:
                if r.get("apiGroups") == [EVENTS_GROUP]:
                    return r
    raise LookupError("self-test: no events rule")


def _cm_rule(docs, named: bool):
    for d in docs:
        if d.get("kind") == "Role":
            for r in d.get("rules") or []:
                if r.get("resources") == ["configmaps"] and bool(r.get("resourceNames")) == named:
                    return r
    raise LookupError("self-test: no configmap rule")


def _pod(docs):
    return _find(docs, "Deployment", lambda d: meta(d).get("name") == APP)["spec"]["template"]["spec"]


def _main(docs):
    return next(c for c in _pod(docs)["containers"] if c["name"] == APP)


def _cache_vol(docs):
    return next(
        v for v in _pod(docs)["volumes"]
        if any((s.get("configMap") or {}).get("name") == CACHE_CONFIGMAP for s in (v.get("projected") or {}).get("sources") or [])
    )


def _cache_src(docs, name):
    return next(s["configMap"] for s in _cache_vol(docs)["projected"]["sources"] if s["configMap"]["name"] == name)


def _cache_mount(docs):
    return next(m for m in _main(docs)["volumeMounts"] if m["name"] == _cache_vol(docs)["name"])


def _rename_cm_name(docs, old, new):
    rule = _cm_rule(docs, True)
    rule["resourceNames"] = [new if n == old else n for n in rule["resourceNames"]]


def _plain_cache_volume(docs):
    """The pre-sharding layout: one configMap volume for the main ConfigMap."""
    vol = _cache_vol(docs)
    vol.pop("projected")
    vol["configMap"] = {"name": CACHE_CONFIGMAP, "optional": True}


def _cache_args(docs, value):
    args = _main(docs)["args"]
    i = next(i for i, a in enumerate(args) if a.startswith("--cache-configmap="))
    args[i] = f"--cache-configmap={value}"


def _drop_rule(docs, rule):
    for d in docs:
        if d.get("kind") in ("Role", "ClusterRole") and rule in (d.get("rules") or []):
            d["rules"].remove(rule)
            return
    raise LookupError("self-test: rule not found")


def _set(d, key, value):
    d[key] = value


def _both_sc(docs, key, value):
    """Set a key at container and pod level (so no fallback hides it)."""
    _main(docs).setdefault("securityContext", {})[key] = value
    _pod(docs).setdefault("securityContext", {})[key] = value


def _del_both_sc(docs, key):
    _main(docs).get("securityContext", {}).pop(key, None)
    _pod(docs).get("securityContext", {}).pop(key, None)


MUTANTS: list[tuple[str, Callable[[list[Doc]], None]]] = [
    ("workload verb delete added", lambda d: _workload_rule(d)["verbs"].append("delete")),
    ("workload verbs wildcard", lambda d: _set(_workload_rule(d), "verbs", ["*"])),
    ("workload verb watch missing", lambda d: _workload_rule(d)["verbs"].remove("watch")),
    ("workload verb update instead of patch",
     lambda d: _set(_workload_rule(d), "verbs", ["get", "list", "watch", "update"])),
    ("secrets added to workload rule", lambda d: _workload_rule(d)["resources"].append("secrets")),
    ("daemonsets missing", lambda d: _workload_rule(d)["resources"].remove("daemonsets")),
    ("extra rule pods/exec",
     lambda d: _find(d, "Role")["rules"].append({"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"]})),
    ("extra rule secrets get",
     lambda d: _find(d, "Role")["rules"].append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]})),
    ("events verb list added", lambda d: _events_rule(d)["verbs"].append("list")),
    ("events verb patch missing", lambda d: _events_rule(d)["verbs"].remove("patch")),
    ("events rule missing", lambda d: _drop_rule(d, _events_rule(d))),
    ("core-group events instead of events.k8s.io", lambda d: _set(_events_rule(d), "apiGroups", [""])),
    ("events rule with secrets", lambda d: _events_rule(d)["resources"].append("secrets")),
    ("configmap get/update without resourceNames", lambda d: _cm_rule(d, True).pop("resourceNames")),
    ("configmap get/update on another name", lambda d: _set(_cm_rule(d, True), "resourceNames", ["kube-root-ca.crt"])),
    ("configmap get/update on main only, no shards", lambda d: _set(_cm_rule(d, True), "resourceNames", [CACHE_CONFIGMAP])),
    ("configmap shard -8 instead of -7 (outside 0-7)",
     lambda d: _rename_cm_name(d, f"{CACHE_CONFIGMAP}-7", f"{CACHE_CONFIGMAP}-8")),
    ("configmap extra shard -8 (outside 0-7)", lambda d: _cm_rule(d, True)["resourceNames"].append(f"{CACHE_CONFIGMAP}-8")),
    ("configmap shard -0 missing", lambda d: _cm_rule(d, True)["resourceNames"].remove(f"{CACHE_CONFIGMAP}-0")),
    ("configmap main name missing", lambda d: _cm_rule(d, True)["resourceNames"].remove(CACHE_CONFIGMAP)),
    ("configmap kube-root-ca.crt added to names", lambda d: _cm_rule(d, True)["resourceNames"].append("kube-root-ca.crt")),
    ("configmap delete added", lambda d: _cm_rule(d, True)["verbs"].append("delete")),
    ("configmap create widened with list", lambda d: _cm_rule(d, False)["verbs"].append("list")),
    ("configmap create missing", lambda d: _drop_rule(d, _cm_rule(d, False))),
    ("nonResourceURLs rule",
     lambda d: _find(d, "Role")["rules"].append({"nonResourceURLs": ["/metrics"], "verbs": ["get"]})),
    ("bound to cluster-admin", lambda d: d.append({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "oops"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT,
                      "namespace": _find(d, "Deployment")["metadata"]["namespace"]}],
    })),
    ("extra subject on a binding", lambda d: _find(d, "RoleBinding")["subjects"].append(
        {"kind": "Group", "name": "system:authenticated", "apiGroup": "rbac.authorization.k8s.io"})),
    ("readOnlyRootFilesystem false", lambda d: _main(d)["securityContext"].__setitem__("readOnlyRootFilesystem", False)),
    ("allowPrivilegeEscalation missing", lambda d: _main(d)["securityContext"].pop("allowPrivilegeEscalation")),
    ("runAsNonRoot removed", lambda d: _del_both_sc(d, "runAsNonRoot")),
    ("runAsUser 0", lambda d: _both_sc(d, "runAsUser", 0)),
    ("capabilities not dropped", lambda d: _main(d)["securityContext"].__setitem__("capabilities", {"drop": []})),
    ("capability NET_ADMIN added",
     lambda d: _main(d)["securityContext"].__setitem__("capabilities", {"drop": ["ALL"], "add": ["NET_ADMIN"]})),
    ("seccomp Unconfined", lambda d: _both_sc(d, "seccompProfile", {"type": "Unconfined"})),
    ("seccomp removed", lambda d: _del_both_sc(d, "seccompProfile")),
    ("privileged", lambda d: _main(d)["securityContext"].__setitem__("privileged", True)),
    ("cache main source optional false", lambda d: _cache_src(d, CACHE_CONFIGMAP).__setitem__("optional", False)),
    ("cache main source optional missing", lambda d: _cache_src(d, CACHE_CONFIGMAP).pop("optional")),
    ("cache shard source optional false",
     lambda d: _cache_src(d, f"{CACHE_CONFIGMAP}-3").__setitem__("optional", False)),
    ("cache shard source optional missing", lambda d: _cache_src(d, f"{CACHE_CONFIGMAP}-7").pop("optional")),
    ("cache shard source -7 missing",
     lambda d: _cache_vol(d)["projected"]["sources"].remove({"configMap": _cache_src(d, f"{CACHE_CONFIGMAP}-7")})),
    ("cache shard source -8 instead of -7",
     lambda d: _cache_src(d, f"{CACHE_CONFIGMAP}-7").__setitem__("name", f"{CACHE_CONFIGMAP}-8")),
    ("cache source with items", lambda d: _cache_src(d, CACHE_CONFIGMAP).__setitem__(
        "items", [{"key": "cache.json", "path": "cache.json"}])),
    ("cache volume with a secret source",
     lambda d: _cache_vol(d)["projected"]["sources"].append({"secret": {"name": "gar-restarter", "optional": True}})),
    ("cache volume back to a plain configMap volume", _plain_cache_volume),
    ("cache volume mounted with subPath", lambda d: _cache_mount(d).__setitem__("subPath", "cache.json")),
    ("cache volume mounted read-write", lambda d: _cache_mount(d).pop("readOnly")),
    ("cache volume removed", lambda d: _pod(d)["volumes"].remove(_cache_vol(d))),
    ("--cache-configmap names another ConfigMap", lambda d: _cache_args(d, "$(POD_NAMESPACE)/my-cache")),
    ("terminationGracePeriodSeconds 20", lambda d: _set(_pod(d), "terminationGracePeriodSeconds", 20)),
    ("terminationGracePeriodSeconds unset", lambda d: _pod(d).pop("terminationGracePeriodSeconds")),
    ("shutdown-timeout raised above grace period", lambda d: _main(d)["args"].append("--shutdown-timeout=45s")),
    ("--namespace with cluster-wide role", lambda d: _main(d)["args"].append("--namespace=apps")),
    ("readiness probe on wrong path",
     lambda d: _main(d)["readinessProbe"]["httpGet"].__setitem__("path", "/healthz")),
    ("Workload Identity annotation removed",
     lambda d: _find(d, "ServiceAccount")["metadata"].pop("annotations")),
]


def _vap(docs):
    return _find(docs, "ValidatingAdmissionPolicy")


def _validation(docs, needle):
    return next(v for v in _vap(docs)["spec"]["validations"] if needle in v["expression"])


def _netpol(docs):
    return _find(docs, "NetworkPolicy")


def _subject(docs, kind):
    return _find(docs, kind)["subjects"][0]


# For a render with every optional component, in namespace EXTRA_NS
# (`--self-test --expect-namespace ops`); each must be rejected.
EXTRA_MUTANTS: list[tuple[str, Callable[[list[Doc]], None]]] = [
    ("RoleBinding subject left in gar-restarter",
     lambda d: _subject(d, "RoleBinding").__setitem__("namespace", "gar-restarter")),
    ("ClusterRoleBinding subject left in gar-restarter",
     lambda d: _subject(d, "ClusterRoleBinding").__setitem__("namespace", "gar-restarter")),
    ("Service left in gar-restarter",
     lambda d: _find(d, "Service")["metadata"].__setitem__("namespace", "gar-restarter")),
    ("env names a Service in gar-restarter", lambda d: _main(d)["env"].append(
        {"name": "PUBSUB_EMULATOR_HOST", "value": "pubsub-emulator.gar-restarter.svc:8085"})),
    ("ServiceMonitor selects another Service",
     lambda d: _find(d, "ServiceMonitor")["spec"]["selector"]["matchLabels"].__setitem__("app.kubernetes.io/name", "x")),
    ("ServiceMonitor scrapes another port",
     lambda d: _find(d, "ServiceMonitor")["spec"]["endpoints"][0].__setitem__("port", "http")),
    ("PodMonitor in another namespace",
     lambda d: _find(d, "PodMonitor")["metadata"].__setitem__("namespace", "default")),
    ("NetworkPolicy ingress on all ports", lambda d: _netpol(d)["spec"]["ingress"][0].pop("ports")),
    ("NetworkPolicy egress to port 22",
     lambda d: _netpol(d)["spec"]["egress"].append({"ports": [{"port": 22, "protocol": "TCP"}]})),
    ("NetworkPolicy egress rule without ports", lambda d: _netpol(d)["spec"]["egress"].append({})),
    ("NetworkPolicy without Egress type", lambda d: _netpol(d)["spec"].__setitem__("policyTypes", ["Ingress"])),
    ("admission binding Audit only",
     lambda d: _find(d, "ValidatingAdmissionPolicyBinding")["spec"].__setitem__("validationActions", ["Audit"])),
    ("admission policy failurePolicy Ignore", lambda d: _vap(d)["spec"].__setitem__("failurePolicy", "Ignore")),
    ("admission policy matches another user", lambda d: _vap(d)["spec"]["matchConditions"][0].__setitem__(
        "expression", "request.userInfo.username == 'system:serviceaccount:gar-restarter:gar-restarter'")),
    ("admission policy allows any annotation",
     lambda d: _validation(d, "restartedAt").__setitem__("expression", "true")),
    ("admission policy drops the image validation",
     lambda d: _vap(d)["spec"]["validations"].remove(_validation(d, "sha256"))),
    ("admission policy without statefulsets", lambda d: _vap(d)["spec"]["matchConstraints"]["resourceRules"][0].__setitem__(
        "resources", ["deployments", "daemonsets"])),
]


def run_cli(paths: list[str], extra: list[str] | None = None) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *(extra or []), *paths],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def self_test(path: str, expect_ns: str | None = None) -> int:
    """Each mutant must be flagged in-process, and the real CLI (a separate
    process, so exit codes are what a shell or CI sees) must exit 0 on the good
    render and 1 on the mutants, naming every mutant file in a VIOLATION."""
    good = load_docs(path)
    missed: set[str] = set()
    extra = ["--expect-namespace", expect_ns] if expect_ns else []
    mutants = MUTANTS + (EXTRA_MUTANTS if expect_ns else [])
    rc, out = run_cli([path], extra)
    if rc != 0:
        print(f"self-test: FAIL the unmodified render {path} is rejected (rc={rc}):\n{out}")
        return 1
    print("self-test: ok   unmodified render accepted (exit 0)")
    cli_ok = True
    with tempfile.TemporaryDirectory(prefix="check-rbac-selftest-") as tmp:
        written: dict[str, str] = {}
        for i, (name, mutate) in enumerate(mutants):
            docs = copy.deepcopy(good)
            try:
                mutate(docs)
            except (LookupError, StopIteration, KeyError, ValueError) as exc:
                print(f"self-test: FAIL cannot build mutant {name!r}: {exc!r}")
                missed.add(name)
                continue
            # Round-trip through YAML so the CLI reads exactly what we checked.
            text = yaml.dump_all(docs, Dumper=Dumper, sort_keys=False)
            errors = check_docs([d for d in yaml.load_all(text, Loader=Loader) if d], expect_ns)
            if errors:
                print(f"self-test: ok   {name:45s} -> {errors[0][:100]}")
            else:
                print(f"self-test: FAIL {name}: not detected")
                missed.add(name)
            bad = os.path.join(tmp, f"mutant-{i:02d}.yaml")
            with open(bad, "w", encoding="utf-8") as fh:
                fh.write(text)
            written[bad] = name
        if written:
            rc, out = run_cli(list(written), extra)
            flagged = {f for f in written if f"{f}: VIOLATION:" in out}
            if rc != 1:
                print(f"self-test: FAIL CLI exit code on bad documents is {rc}, expected 1")
                cli_ok = False
            for f in sorted(set(written) - flagged):
                print(f"self-test: FAIL CLI did not flag mutant {written[f]!r}")
                missed.add(written[f])
            if rc == 1 and flagged == set(written):
                print(f"self-test: ok   CLI exits 1 and flags all {len(written)} bad documents")
    total = len(mutants)
    if missed or not cli_ok:
        print(f"self-test: FAILED, {total - len(missed)}/{total} bad documents rejected")
        return 1
    print(f"self-test: all {total} bad documents rejected")
    return 0


def check_codec(path: str) -> int:
    """MAX_SHARDS in src/index/cache/codec.rs must be CACHE_MAX_SHARDS: the RBAC
    resourceNames and the projected volume list exactly that many shards."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        print(f"{path}: ERROR: {exc}")
        return 2
    m = re.search(r"\bpub\s+const\s+MAX_SHARDS\s*:\s*usize\s*=\s*([0-9_]+)\s*;", text)
    if not m:
        print(f"{path}: ERROR: no `pub const MAX_SHARDS: usize = N;` found")
        return 2
    n = int(m.group(1).replace("_", ""))
    if n != CACHE_MAX_SHARDS:
        print(
            f"{path}: VIOLATION: MAX_SHARDS = {n}, but deploy/ grants and mounts {CACHE_MAX_SHARDS} shards "
            f"({CACHE_CONFIGMAP}-0..{CACHE_MAX_SHARDS - 1}); update CACHE_MAX_SHARDS in check_rbac.py, "
            "rbac-cache.yaml and the cache volume in deployment.yaml together"
        )
        return 1
    print(f"{path}: MAX_SHARDS = {n} matches the deploy/ shard names")
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--self-test", action="store_true", help="mutate the given good render and expect rejections")
    p.add_argument("--codec", metavar="CODEC_RS", help="check MAX_SHARDS in src/index/cache/codec.rs instead")
    p.add_argument("--expect-namespace", metavar="NS", help="also check that the daemon and its objects live in NS")
    p.add_argument("files", nargs="*", help="rendered multi-document YAML (kubectl kustomize output)")
    a = p.parse_args(argv)
    if a.codec:
        if a.files or a.self_test:
            p.error("--codec takes no rendered files")
        return check_codec(a.codec)
    if not a.files:
        p.error("no rendered files given")
    if a.self_test:
        return max(self_test(f, a.expect_namespace) for f in a.files)
    rc = 0
    for f in a.files:
        try:
            errors = check_docs(load_docs(f), a.expect_namespace)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            print(f"{f}: ERROR: {exc}")
            return 2
        if errors:
            rc = 1
            for e in errors:
                print(f"{f}: VIOLATION: {e}")
        else:
            print(f"{f}: policy ok")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
