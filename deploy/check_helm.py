"""Renders the Helm chart offline with Helm's own Go SDK (helm-python-sdk, no helm binary) and
checks it: `helm lint --strict`, the values against values.schema.json, and every rendered
object against the Kubernetes schemas (kubernetes-validate), for the default values and for each
optional mode. Exits non-zero on any problem."""
import pathlib
import sys
import tempfile

import helm_python as helm
import kubernetes_validate
import yaml

CHART = pathlib.Path(__file__).parent / "helm" / "etl-platform"
KUBE_VERSION = "1.30.0"

# (what, values overriding the defaults, objects expected by kind)
VARIANTS = [
    ("defaults with a chart-made secret", {"database": {"url": "postgres://etl:pw@db:5432/etl"}},
     {"Deployment": 3, "Service": 1, "ConfigMap": 1, "Secret": 1, "Job": 1}),
    ("existing secret, cronjob ingester, autoscaled query, trace export",
     {"database": {"existingSecret": "etl-db"}, "ingester": {"mode": "cronjob"},
      "otel": {"endpoint": "http://otel-collector.observability:4318"},
      "query": {"autoscaling": {"enabled": True}, "corsOrigins": ["https://app.example.com"]}},
     {"Deployment": 2, "CronJob": 1, "HorizontalPodAutoscaler": 1, "Service": 1, "ConfigMap": 1, "Job": 1}),
    ("API keys and the admin token from Secrets, with a rate limit",
     {"database": {"existingSecret": "etl-db"}, "adminToken": {"secretName": "etl-admin"},
      "query": {"apiKeys": {"secretName": "etl-query-keys"}, "rateLimitPerSecond": 50}},
     {"Deployment": 3, "Service": 1, "ConfigMap": 1, "Job": 1}),
    ("TLS to Postgres with the CA from a Secret",
     {"database": {"existingSecret": "etl-db", "sslmode": "verify-full",
                   "caCert": {"secretName": "pg-ca", "key": "root.crt"}}},
     {"Deployment": 3, "Service": 1, "ConfigMap": 1, "Job": 1}),
    ("TLS to Postgres with the CA from a ConfigMap, cronjob ingester",
     {"database": {"existingSecret": "etl-db", "sslmode": "verify-ca",
                   "caCert": {"configMapName": "pg-ca"}}, "ingester": {"mode": "cronjob"}},
     {"Deployment": 2, "CronJob": 1, "Service": 1, "ConfigMap": 1, "Job": 1}),
]


def pod_specs(obj):
    """The pod spec of a workload, if it is one."""
    spec = obj.get("spec", {})
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return [spec["template"]["spec"]] if "template" in spec else []


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
            try:
                kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                failures.append(f"{what}: {path}: {obj['kind']} {obj['metadata']['name']}: {e.message}")
    failures += check_database_tls(what, values, objects)
    failures += check_ingester_spool(what, objects)
    failures += check_api_keys(what, values, objects)
    failures += check_admin_token(what, values, objects)
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

if failures:
    print("\n".join(failures), file=sys.stderr)
    sys.exit(1)
