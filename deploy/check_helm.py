"""Renders the Helm chart offline with Helm's own Go SDK (helm-python-sdk, no helm binary) and
checks it: `helm lint --strict`, the values against values.schema.json, and every rendered
object against the Kubernetes schemas (kubernetes-validate), for the default values, each
optional mode, every option on at once and an OpenShift-style install (no fixed uid). The
Prometheus Operator's kinds (ServiceMonitor, PodMonitor) have no schema here: they are checked
field by field against the Services and pods they scrape. Each option's objects and settings
are asserted where it is on, and their absence where it is off. Exits non-zero on any
problem."""
import pathlib
import sys
import tempfile

import helm_python as helm
import kubernetes_validate
import yaml

CHART = pathlib.Path(__file__).parent / "helm" / "etl-platform"
KUBE_VERSION = "1.30.0"

# What every install has: three Deployments, the query Service and two admin Services, the
# sources ConfigMap, the migration Job, the ServiceAccount and a PodDisruptionBudget per service.
BASE = {"Deployment": 3, "Service": 3, "ConfigMap": 1, "Job": 1, "ServiceAccount": 1,
        "PodDisruptionBudget": 3}
# The ingester as a CronJob: no Deployment, admin Service or budget of its own.
CRONJOB = {"Deployment": 2, "CronJob": 1, "Service": 2, "PodDisruptionBudget": 2}

EVERYTHING = {
    "global": {"imageRegistry": "registry.example.com"},
    "database": {"existingSecret": "etl-db", "sslmode": "verify-full",
                 "caCert": {"secretName": "pg-ca"}},
    "imagePullSecrets": [{"name": "regcred"}],
    "serviceAccount": {"name": "etl-runner",
                       "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/etl"}},
    "podAnnotations": {"example.com/team": "data"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "etl",
                     "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "node-role.example.com/etl", "operator": "Exists"}]}]}}},
    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                   "whenUnsatisfiable": "ScheduleAnyway"}],
    "podDisruptionBudget": {"maxUnavailable": 2},
    "networkPolicy": {"enabled": True,
                      "queryFrom": [{"namespaceSelector": {"matchLabels": {
                          "kubernetes.io/metadata.name": "apps"}}}],
                      "adminFrom": [{"namespaceSelector": {"matchLabels": {
                          "kubernetes.io/metadata.name": "monitoring"}}}]},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
                "podMonitor": {"enabled": True, "interval": "15s"}},
    "migrate": {"backoffLimit": 1, "activeDeadlineSeconds": 300,
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"},
                              "limits": {"memory": "64Mi"}}},
    "adminToken": {"secretName": "etl-admin"},
    "otel": {"endpoint": "http://otel-collector.observability:4318"},
    "query": {"apiKeys": {"secretName": "etl-query-keys"}, "rateLimitPerSecond": 50,
              "tls": {"secretName": "etl-query-tls"}, "preStopSleepSeconds": 8,
              "autoscaling": {"enabled": True},
              "ingress": {"enabled": True, "className": "nginx",
                          "annotations": {"cert-manager.io/cluster-issuer": "letsencrypt",
                                          "nginx.ingress.kubernetes.io/backend-protocol": "HTTPS"},
                          "hosts": ["etl.example.com"],
                          "tls": [{"secretName": "etl-api-tls", "hosts": ["etl.example.com"]}]}},
}

# (what, values overriding the defaults, objects expected by kind)
VARIANTS = [
    ("defaults with a chart-made secret", {"database": {"url": "postgres://etl:pw@db:5432/etl"}},
     {**BASE, "Secret": 1}),
    ("existing secret, cronjob ingester, autoscaled query, trace export",
     {"database": {"existingSecret": "etl-db"}, "ingester": {"mode": "cronjob"},
      "otel": {"endpoint": "http://otel-collector.observability:4318"},
      "query": {"autoscaling": {"enabled": True}, "corsOrigins": ["https://app.example.com"]}},
     {**BASE, **CRONJOB, "HorizontalPodAutoscaler": 1}),
    ("API keys and the admin token from Secrets, with a rate limit",
     {"database": {"existingSecret": "etl-db"}, "adminToken": {"secretName": "etl-admin"},
      "query": {"apiKeys": {"secretName": "etl-query-keys"}, "rateLimitPerSecond": 50}},
     BASE),
    ("TLS to Postgres with the CA from a Secret",
     {"database": {"existingSecret": "etl-db", "sslmode": "verify-full",
                   "caCert": {"secretName": "pg-ca", "key": "root.crt"}}},
     BASE),
    ("TLS to Postgres with the CA from a ConfigMap, cronjob ingester",
     {"database": {"existingSecret": "etl-db", "sslmode": "verify-ca",
                   "caCert": {"configMapName": "pg-ca"}}, "ingester": {"mode": "cronjob"}},
     {**BASE, **CRONJOB}),
    ("every option on", EVERYTHING,
     {**BASE, "HorizontalPodAutoscaler": 1, "NetworkPolicy": 3, "ServiceMonitor": 3,
      "PodMonitor": 3, "Ingress": 1}),
    ("every option on, cronjob ingester, no budgets",
     {**EVERYTHING, "ingester": {"mode": "cronjob"}, "podDisruptionBudget": {"enabled": False}},
     {**BASE, **CRONJOB, "PodDisruptionBudget": 0, "HorizontalPodAutoscaler": 1,
      "NetworkPolicy": 2, "ServiceMonitor": 2, "PodMonitor": 2, "Ingress": 1}),
    ("OpenShift-style: no fixed uid, an existing service account",
     {"database": {"existingSecret": "etl-db"},
      "podSecurityContext": {"runAsUser": None, "runAsGroup": None},
      "serviceAccount": {"create": False, "name": "etl"}},
     {**BASE, "ServiceAccount": 0}),
]

# Kinds of the Prometheus Operator: no schema to validate against here.
OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor"}


def pod_templates(obj):
    """The pod template (metadata and spec) of a workload, if it is one."""
    spec = obj.get("spec", {})
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return [spec["template"]] if obj["kind"] in ("Deployment", "Job", "CronJob") else []


def pod_specs(obj):
    """The pod spec of a workload, if it is one."""
    return [template["spec"] for template in pod_templates(obj)]


def get(values, path, default=None):
    """values["a"]["b"]… for path "a.b…", or `default` when any part is missing."""
    for part in path.split("."):
        if not isinstance(values, dict) or part not in values:
            return default
        values = values[part]
    return values


def check_pods(what, values, objects):
    """Every pod: the service account without an API token, pull secrets, scheduling, the pod
    annotations, spread constraints keyed to its own component, non-root with the uid only
    when one is set."""
    problems = []
    creates = get(values, "serviceAccount.create", True)
    account = get(values, "serviceAccount.name") or ("etl-etl-platform" if creates else "default")
    uid = get(values, "podSecurityContext", {}).get("runAsUser", 10001)
    gid = get(values, "podSecurityContext", {}).get("runAsGroup", 10001)
    for obj in objects:
        for template in pod_templates(obj):
            name = f"{obj['kind']} {obj['metadata']['name']}"
            pod = template["spec"]
            hook = obj["kind"] == "Job"
            wanted_account = "default" if hook and creates else account
            if pod.get("serviceAccountName") != wanted_account:
                problems.append(f"{name}: serviceAccountName {pod.get('serviceAccountName')}")
            if pod.get("automountServiceAccountToken") is not False:
                problems.append(f"{name}: the API token is mounted")
            for key in ("imagePullSecrets", "nodeSelector", "tolerations", "affinity"):
                if pod.get(key) != (values.get(key) or None):
                    problems.append(f"{name}: {key} = {pod.get(key)}")
            labels = template["metadata"]["labels"]
            wanted_spread = [{**c, "labelSelector": {"matchLabels": labels}}
                             for c in values.get("topologySpreadConstraints", [])]
            if pod.get("topologySpreadConstraints") != (wanted_spread or None):
                problems.append(f"{name}: topologySpreadConstraints = "
                                f"{pod.get('topologySpreadConstraints')}")
            annotations = template["metadata"].get("annotations", {})
            for key, value in values.get("podAnnotations", {}).items():
                if annotations.get(key) != value:
                    problems.append(f"{name}: pod annotation {key} = {annotations.get(key)}")
            security = pod.get("securityContext", {})
            if security.get("runAsNonRoot") is not True:
                problems.append(f"{name}: may run as root")
            if security.get("runAsUser") != uid or security.get("runAsGroup") != gid:
                problems.append(f"{name}: uid/gid {security.get('runAsUser')}/"
                                f"{security.get('runAsGroup')}, wanted {uid}/{gid}")
            for container in pod["containers"]:
                if "runAsUser" in container.get("securityContext", {}):
                    problems.append(f"{name}: a container fixes its uid")
    accounts = [o for o in objects if o["kind"] == "ServiceAccount"]
    if creates:
        if [a["metadata"]["name"] for a in accounts] != [account]:
            problems.append(f"service accounts {[a['metadata']['name'] for a in accounts]}")
        elif accounts[0].get("automountServiceAccountToken") is not False:
            problems.append("the ServiceAccount mounts its token")
        elif accounts[0]["metadata"].get("annotations") != (
                get(values, "serviceAccount.annotations") or None):
            problems.append(f"ServiceAccount annotations {accounts[0]['metadata']}")
    return [f"{what}: {p}" for p in problems]


def deployments(objects):
    return [o for o in objects if o["kind"] == "Deployment"]


def component(obj):
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def container_ports(deployment):
    """Port name -> number of the Deployment's container."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def check_budgets_and_services(what, values, objects):
    """A PodDisruptionBudget per Deployment (unless disabled) with its selector; a Service
    per Deployment on its port: `http` for the query API, `admin` for the others."""
    problems = []
    budgets = {component(o): o for o in objects if o["kind"] == "PodDisruptionBudget"}
    services = {component(o): o for o in objects if o["kind"] == "Service"}
    enabled = get(values, "podDisruptionBudget.enabled", True)
    most = get(values, "podDisruptionBudget.maxUnavailable", 1)
    for deployment in deployments(objects):
        name = component(deployment)
        selector = deployment["spec"]["selector"]["matchLabels"]
        budget = budgets.pop(name, None)
        if enabled and (budget is None or budget["spec"] != {
                "maxUnavailable": most, "selector": {"matchLabels": selector}}):
            problems.append(f"{name}: PodDisruptionBudget {budget}")
        service = services.pop(name, None)
        port = "http" if name == "query" else "admin"
        if (service is None or service["spec"]["selector"] != selector
                or [p["targetPort"] for p in service["spec"]["ports"]] != [port]
                or port not in container_ports(deployment)):
            problems.append(f"{name}: no Service on its {port} port: {service}")
    if budgets or services:
        problems.append(f"budgets or services for no Deployment: {list(budgets) + list(services)}")
    return [f"{what}: {p}" for p in problems]


def check_monitors(what, values, objects):
    """Each enabled monitor kind: one per Deployment, scraping /metrics on a port its Service
    (ServiceMonitor) or its pods (PodMonitor) have, with the configured labels and interval;
    over HTTPS, with the CA of its Secret, for a query API that serves TLS."""
    problems = []
    services = {component(o): o for o in objects if o["kind"] == "Service"}
    query_tls = get(values, "query.tls.secretName")
    for kind, key, endpoints in (("ServiceMonitor", "serviceMonitor", "endpoints"),
                                 ("PodMonitor", "podMonitor", "podMetricsEndpoints")):
        settings = get(values, f"metrics.{key}", {})
        monitors = {component(o): o for o in objects if o["kind"] == kind}
        if not settings.get("enabled"):
            if monitors:
                problems.append(f"{kind}s though none is enabled")
            continue
        for deployment in deployments(objects):
            name = component(deployment)
            monitor = monitors.pop(name, None)
            if monitor is None:
                problems.append(f"{name}: no {kind}")
                continue
            target = services[name]["metadata"]["labels"] if kind == "ServiceMonitor" \
                else deployment["spec"]["template"]["metadata"]["labels"]
            ports = [p["name"] for p in services[name]["spec"]["ports"]] \
                if kind == "ServiceMonitor" else list(container_ports(deployment))
            selector = monitor["spec"]["selector"]["matchLabels"]
            if any(target.get(k) != v for k, v in selector.items()):
                problems.append(f"{name}: {kind} selects {selector}, not {target}")
            for label, value in settings.get("labels", {}).items():
                if monitor["metadata"]["labels"].get(label) != value:
                    problems.append(f"{name}: {kind} label {label}")
            for endpoint in monitor["spec"][endpoints]:
                if endpoint["port"] not in ports or endpoint["path"] != "/metrics":
                    problems.append(f"{name}: {kind} scrapes {endpoint}, ports are {ports}")
                if endpoint["interval"] != settings.get("interval", "30s"):
                    problems.append(f"{name}: {kind} interval {endpoint['interval']}")
                https = name == "query" and bool(query_tls)
                if (endpoint.get("scheme") == "https") != https or (https and get(
                        endpoint, "tlsConfig.ca.secret.name") != query_tls):
                    problems.append(f"{name}: {kind} scheme {endpoint}")
        if monitors:
            problems.append(f"{kind}s for no Deployment: {list(monitors)}")
    return [f"{what}: {p}" for p in problems]


def check_network_policies(what, values, objects):
    """With networkPolicy.enabled, an ingress policy per Deployment selecting its pods: the
    query port from queryFrom (anywhere when empty), the admin port from adminFrom (nothing
    when empty)."""
    problems = []
    policies = {component(o): o for o in objects if o["kind"] == "NetworkPolicy"}
    enabled = get(values, "networkPolicy.enabled", False)
    for deployment in deployments(objects):
        name = component(deployment)
        policy = policies.pop(name, None)
        if not enabled:
            continue
        if policy is None:
            problems.append(f"{name}: no NetworkPolicy")
            continue
        spec = policy["spec"]
        if spec["podSelector"]["matchLabels"] != deployment["spec"]["selector"]["matchLabels"]:
            problems.append(f"{name}: the policy selects {spec['podSelector']}")
        port = "http" if name == "query" else "admin"
        if port not in container_ports(deployment):
            problems.append(f"{name}: the policy's port {port} is not the container's")
        peers = get(values, "networkPolicy.queryFrom" if name == "query"
                    else "networkPolicy.adminFrom", [])
        if name != "query" and not peers:
            wanted = []
        else:
            rule = {"ports": [{"port": port}]}
            if peers:
                rule["from"] = peers
            wanted = [rule]
        if spec.get("policyTypes") != ["Ingress"] or spec.get("ingress") != wanted:
            problems.append(f"{name}: ingress {spec.get('ingress')}, wanted {wanted}")
    if policies:
        problems.append(f"NetworkPolicies though {'none is' if not enabled else 'no Deployment is'}"
                        f" wanted: {list(policies)}")
    return [f"{what}: {p}" for p in problems]


def check_query_edge(what, values, objects):
    """The query API's edge: the Ingress to its Service (host, class, annotations, TLS), HTTPS
    in the pods (certificate and key from the Secret, probes over HTTPS), and the preStop
    sleep, shorter than the grace period."""
    problems = []
    query = values.get("query", {})
    ingress = [o for o in objects if o["kind"] == "Ingress"]
    settings = query.get("ingress", {})
    if settings.get("enabled"):
        service = next(o for o in objects if o["kind"] == "Service" and component(o) == "query")
        spec = ingress[0]["spec"] if len(ingress) == 1 else {}
        backends = [(r["host"], p["backend"]["service"]) for r in spec.get("rules", [])
                    for p in r["http"]["paths"]]
        wanted = [(host, {"name": service["metadata"]["name"], "port": {"name": "http"}})
                  for host in settings.get("hosts", [])]
        if backends != wanted or not wanted:
            problems.append(f"Ingress routes {backends}, wanted {wanted}")
        if spec.get("tls") != (settings.get("tls") or None):
            problems.append(f"Ingress tls {spec.get('tls')}")
        if spec.get("ingressClassName") != (settings.get("className") or None):
            problems.append(f"Ingress class {spec.get('ingressClassName')}")
        if ingress and ingress[0]["metadata"].get("annotations") != (settings.get("annotations") or None):
            problems.append(f"Ingress annotations {ingress[0]['metadata'].get('annotations')}")
    elif ingress:
        problems.append("an Ingress though none is enabled")
    is_query = lambda name: name.startswith("Deployment ") and name.endswith("-query")
    tls = get(query, "tls.secretName")
    problems += check_secret_file(what, objects, is_query, tls, "QUERY_TLS_CERT_FILE",
                                  "/etc/etl-query-tls/tls.crt", "query-tls")
    sleep = query.get("preStopSleepSeconds", 5)
    grace = values.get("terminationGracePeriodSeconds", 30)
    for deployment in deployments(objects):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        schemes = {container[p]["httpGet"]["scheme"] for p in ("livenessProbe", "readinessProbe")}
        wanted = {"HTTPS"} if tls and component(deployment) == "query" else {"HTTP"}
        if schemes != wanted:
            problems.append(f"{component(deployment)}: probes over {schemes}")
        env = {e["name"]: e.get("value") for e in container["env"]}
        if tls and component(deployment) == "query" and \
                env.get("QUERY_TLS_KEY_FILE") != "/etc/etl-query-tls/tls.key":
            problems.append(f"query: QUERY_TLS_KEY_FILE = {env.get('QUERY_TLS_KEY_FILE')}")
        pre_stop = get(container, "lifecycle.preStop.exec.command")
        wanted_stop = ["sleep", str(sleep)] if sleep and component(deployment) == "query" else None
        if pre_stop != wanted_stop or (wanted_stop and sleep >= grace):
            problems.append(f"{component(deployment)}: preStop {pre_stop}, wanted {wanted_stop}")
    return [f"{what}: {p}" for p in problems]


def check_migration(what, values, objects):
    """The migration Job is bounded: resources, a deadline and a backoff limit."""
    jobs = [o for o in objects if o["kind"] == "Job"]
    wanted = {
        "backoffLimit": get(values, "migrate.backoffLimit", 3),
        "activeDeadlineSeconds": get(values, "migrate.activeDeadlineSeconds", 600),
        "resources": get(values, "migrate.resources",
                         {"requests": {"cpu": "50m", "memory": "32Mi"},
                          "limits": {"memory": "128Mi"}}),
    }
    problems = []
    for job in jobs:
        got = {"backoffLimit": job["spec"].get("backoffLimit"),
               "activeDeadlineSeconds": job["spec"].get("activeDeadlineSeconds"),
               "resources": job["spec"]["template"]["spec"]["containers"][0].get("resources")}
        if got != wanted:
            problems.append(f"migration Job {got}, wanted {wanted}")
    return [f"{what}: {p}" for p in problems]


def check_database_tls(what, values, objects):
    """Every pod that connects to Postgres gets PGSSLMODE / PGSSLROOTCERT and the CA mounted."""
    database = values.get("database", {})
    ca = database.get("caCert", {})
    key = ca.get("key", "ca.crt")
    problems = []
    for obj in objects:
        for pod in pod_specs(obj):
            name = f"{obj['kind']} {obj['metadata']['name']}"
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for container in pod["containers"]:
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
                if env.get("PGSSLMODE") != (database.get("sslmode") or None):
                    problems.append(f"{name}: PGSSLMODE = {env.get('PGSSLMODE')}")
                if not (ca.get("secretName") or ca.get("configMapName")):
                    if "PGSSLROOTCERT" in env or "postgres-ca" in volumes:
                        problems.append(f"{name}: a CA is mounted though none is configured")
                    continue
                if env.get("PGSSLROOTCERT") != f"/etc/etl-postgres-ca/{key}":
                    problems.append(f"{name}: PGSSLROOTCERT = {env.get('PGSSLROOTCERT')}")
                if mounts.get("postgres-ca") != "/etc/etl-postgres-ca":
                    problems.append(f"{name}: the CA is not mounted: {mounts}")
                source = volumes.get("postgres-ca", {})
                if ca.get("secretName") and source.get("secret", {}).get("secretName") != ca["secretName"]:
                    problems.append(f"{name}: CA volume {source}")
                if ca.get("configMapName") and source.get("configMap", {}).get("name") != ca["configMapName"]:
                    problems.append(f"{name}: CA volume {source}")
    return [f"{what}: {p}" for p in problems]

def containers(objects):
    """(name, pod volumes by name, env, mounts by volume) of every container of `objects`."""
    for obj in objects:
        for pod in pod_specs(obj):
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for container in pod["containers"]:
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
                yield f"{obj['kind']} {obj['metadata']['name']}", volumes, env, mounts


def check_secret_file(what, objects, wanted, secret, var, path, volume):
    """Where `wanted(name)` and a Secret is set, `var` is `path`, a file of the Secret `secret`
    mounted from volume `volume`; everywhere else, neither the variable nor the volume."""
    problems = []
    for name, volumes, env, mounts in containers(objects):
        if not (secret and wanted(name)):
            if var in env or volume in volumes:
                problems.append(f"{name}: {var} or volume {volume} though none is wanted")
            continue
        if env.get(var) != path:
            problems.append(f"{name}: {var} = {env.get(var)}")
        if mounts.get(volume) != path.rsplit("/", 1)[0]:
            problems.append(f"{name}: {path} is not mounted: {mounts}")
        if volumes.get(volume, {}).get("secret", {}).get("secretName") != secret:
            problems.append(f"{name}: volume {volumes.get(volume)}")
    return [f"{what}: {p}" for p in problems]


def check_api_keys(what, values, objects):
    """With query.apiKeys.secretName, the query pods read the keys file from that Secret (and
    the rate limit when set); without it, no keys variable, volume or limit at all."""
    query = values.get("query", {})
    secret = query.get("apiKeys", {}).get("secretName")
    limit = query.get("rateLimitPerSecond", 0)
    is_query = lambda name: name.startswith("Deployment ") and name.endswith("-query")
    problems = check_secret_file(what, objects, is_query, secret, "QUERY_API_KEYS_FILE",
                                 "/etc/etl-query-keys/keys.toml", "api-keys")
    for name, _, env, _ in containers(objects):
        wanted = str(limit) if secret and limit and is_query(name) else None
        if env.get("QUERY_RATE_LIMIT_PER_SECOND") != wanted:
            problems.append(f"{what}: {name}: QUERY_RATE_LIMIT_PER_SECOND = "
                            f"{env.get('QUERY_RATE_LIMIT_PER_SECOND')}")
    return problems


def check_admin_token(what, values, objects):
    """With adminToken.secretName, the ingester Deployment reads its admin token from that
    Secret; without it, no token variable or volume anywhere."""
    is_ingester = lambda name: name.startswith("Deployment ") and name.endswith("-ingester")
    return check_secret_file(what, objects, is_ingester,
                             values.get("adminToken", {}).get("secretName"),
                             "ADMIN_TOKEN_FILE", "/etc/etl-admin/token", "admin-token")


def check_ingester_spool(what, objects):
    """The ingester spools large REST pages to /tmp: with a read-only root filesystem, /tmp must
    be a writable emptyDir with a size limit."""
    problems = []
    for obj in objects:
        if not obj["metadata"]["name"].endswith("-ingester"):
            continue
        for pod in pod_specs(obj):
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for container in pod["containers"]:
                mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
                tmp = mounts.get("/tmp")
                if not tmp or tmp.get("readOnly"):
                    problems.append(f"{obj['kind']}: no writable /tmp: {list(mounts)}")
                    continue
                if not volumes.get(tmp["name"], {}).get("emptyDir", {}).get("sizeLimit"):
                    problems.append(f"{obj['kind']}: /tmp is not a size-limited emptyDir")
    return [f"{what}: {p}" for p in problems]


failures = []
report = helm.lint(str(CHART), {"database": {"url": "postgres://etl:pw@db:5432/etl"}}, strict=True)
for message in report.get("messages", []):
    if message.get("severity", 0) >= 2:
        failures.append(f"helm lint: {message}")
failures += [f"helm lint: {e}" for e in report.get("errors", [])]

chart = helm.Chart.load(str(CHART))
for what, values, expected in VARIANTS:
    try:
        chart.validate_schema(values)
        rendered = chart.render(values, name="etl", namespace="etl", is_install=True)
    except helm.HelmError as e:
        failures.append(f"{what}: {e}")
        continue
    kinds = {}
    objects = []
    for path, text in rendered.items():
        for obj in yaml.safe_load_all(text):
            if not obj:
                continue
            objects.append(obj)
            kinds[obj["kind"]] = kinds.get(obj["kind"], 0) + 1
            if obj["kind"] in OPERATOR_KINDS:
                continue
            try:
                kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                failures.append(f"{what}: {path}: {obj['kind']} {obj['metadata']['name']}: {e.message}")
    failures += check_database_tls(what, values, objects)
    failures += check_ingester_spool(what, objects)
    failures += check_api_keys(what, values, objects)
    failures += check_admin_token(what, values, objects)
    failures += check_pods(what, values, objects)
    failures += check_budgets_and_services(what, values, objects)
    failures += check_monitors(what, values, objects)
    failures += check_network_policies(what, values, objects)
    failures += check_query_edge(what, values, objects)
    failures += check_migration(what, values, objects)
    expected = {kind: n for kind, n in expected.items() if n}
    if kinds != expected:
        failures.append(f"{what}: rendered {kinds}, expected {expected}")
    exporting = "OTEL_EXPORTER_OTLP_ENDPOINT" in "".join(rendered.values())
    if exporting != bool(values.get("otel", {}).get("endpoint")):
        failures.append(f"{what}: trace export env {'present' if exporting else 'missing'}")
    print(f"ok: {what}: {sum(kinds.values())} objects valid for Kubernetes {KUBE_VERSION}")

# A value outside the schema must be refused.
try:
    chart.validate_schema({"ingester": {"mode": "sometimes"}})
    failures.append("values.schema.json accepted ingester.mode = sometimes")
except helm.HelmError:
    print("ok: values.schema.json refuses a bad value")
for bad in ({"podSecurityContext": {"runAsUser": 0}}, {"query": {"ingress": {"hosts": [""]}}},
            {"metrics": {"podMonitor": {"interval": "often"}}}):
    try:
        chart.validate_schema(bad)
        failures.append(f"values.schema.json accepted {bad}")
    except helm.HelmError:
        pass

if failures:
    print("\n".join(failures), file=sys.stderr)
    sys.exit(1)
