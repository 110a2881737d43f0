"""Checks the compose stack as Compose resolves it (`docker-compose config`), without a Docker
engine: the default stack, the observability profile and the own-secrets override. That the
stack serves the demo with no edit (a demo source serving deploy/demo/, the sources file
pointing at it), that no secret is written in the files (the database password and the admin
token come from files, through *_FILE variables, each file mounted where its variable says),
and that the observability profile is wired: the services' OTLP to the collector's receiver,
the collector's traces to Jaeger, Prometheus scraping every service's /metrics port and the
collector. Exits non-zero on any problem."""
import pathlib
import subprocess
import sys
import tomllib
import urllib.parse

import yaml

DEPLOY = pathlib.Path(__file__).parent
ETL = {"ingester": "INGESTER_ADMIN_ADDR", "normalizer": "NORMALIZER_ADMIN_ADDR",
       "query": "QUERY_ADDR"}
problems = []


def resolved(*args):
    out = subprocess.run(["docker-compose", "-f", str(DEPLOY / "compose.yaml"), *args, "config"],
                         check=True, capture_output=True, text=True).stdout
    return yaml.safe_load(out)


def mounts(service):
    """Container path -> (kind, source) of a service's volumes and secrets."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        found[target] = ("volume", source)
    for secret in service.get("secrets", []):
        name = secret if isinstance(secret, str) else secret["source"]
        found[f"/run/secrets/{name}"] = ("secret", name)
    return found


def check_files(what, config):
    """Every *_FILE variable names a file inside something mounted into its service, and no
    password is given in clear."""
    for name, service in config["services"].items():
        env = service.get("environment", {})
        for var, value in env.items():
            if "PASSWORD" in var and not var.endswith("_FILE"):
                problems.append(f"{what}: {name}: {var} is set in clear")
            if var.endswith("_FILE") and value:
                if not any(value == target or value.startswith(target.rstrip("/") + "/")
                           for target in mounts(service)):
                    problems.append(f"{what}: {name}: {var}={value} is not mounted: "
                                    f"{list(mounts(service))}")
        url = env.get("DATABASE_URL", "")
        if urllib.parse.urlsplit(url).password:
            problems.append(f"{what}: {name}: DATABASE_URL carries a password")
    for name in ("migrate", *ETL):
        if not config["services"][name]["environment"].get("DATABASE_PASSWORD_FILE"):
            problems.append(f"{what}: {name} gets no DATABASE_PASSWORD_FILE")
    if not config["services"]["ingester"]["environment"].get("ADMIN_TOKEN_FILE"):
        problems.append(f"{what}: the ingester gets no ADMIN_TOKEN_FILE")
    postgres = config["services"]["postgres"]["environment"]
    if postgres.get("POSTGRES_PASSWORD_FILE") != config["services"]["ingester"]["environment"][
            "DATABASE_PASSWORD_FILE"]:
        problems.append(f"{what}: Postgres and the services read different password files")


def check_demo(config):
    """The stack serves the demo as it is: a demo source serving deploy/demo/, and the
    mounted sources file's every URL on a service of the stack."""
    demo = config["services"].get("demo-source")
    if not demo or not any(src.endswith("/deploy/demo") for kind, src in mounts(demo).values()):
        problems.append("no demo-source serving deploy/demo/")
    sources_file = next(src for target, (kind, src) in mounts(config["services"]["ingester"]).items()
                        if target == "/etc/etl/sources.toml")
    sources = tomllib.loads(pathlib.Path(sources_file).read_text())["source"]
    if not sources:
        problems.append("the compose sources file declares no source")
    for source in sources:
        host = urllib.parse.urlsplit(source["url"]).hostname
        if host not in config["services"]:
            problems.append(f"source {source['name']}: {host} is not a service of the stack")
        if pathlib.Path(sources_file).parent.joinpath(
                "demo", urllib.parse.urlsplit(source["url"]).path.lstrip("/")).is_file() is False:
            problems.append(f"source {source['name']}: deploy/demo has no such file")


def check_observability(config):
    services = config["services"]
    for name in ("otel-collector", "prometheus", "jaeger"):
        if name not in services or services[name].get("profiles") != ["observability"]:
            problems.append(f"observability: {name} missing or not in the profile")
    collector = yaml.safe_load((DEPLOY / "observability/otel-collector.yaml").read_text())
    http = collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    documented = "http://otel-collector:4318"
    if not http.endswith(":" + documented.rsplit(":", 1)[1]):
        problems.append(f"observability: the collector listens on {http}, not {documented}")
    compose_text = (DEPLOY / "compose.yaml").read_text()
    if f"OTEL_EXPORTER_OTLP_ENDPOINT={documented}" not in compose_text:
        problems.append("observability: compose.yaml does not say how to point the services at it")
    for kind, pipeline in collector["service"]["pipelines"].items():
        for part in ("receivers", "processors", "exporters"):
            for name in pipeline.get(part, []):
                if name not in collector.get(part, {}):
                    problems.append(f"observability: the {kind} pipeline's {name} is not defined")
    traces = collector["service"]["pipelines"]["traces"]["exporters"]
    jaeger = [collector["exporters"][e]["endpoint"] for e in traces if e.startswith("otlp")]
    if jaeger != ["jaeger:4317"] or services["jaeger"]["environment"].get(
            "COLLECTOR_OTLP_ENABLED") != "true":
        problems.append(f"observability: traces go to {jaeger}, Jaeger's OTLP is not on")
    prometheus = yaml.safe_load((DEPLOY / "observability/prometheus.yml").read_text())
    targets = set()
    for job in prometheus["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            targets |= {f"{n}:{sd['port']}" for n in sd["names"]}
        for static in job.get("static_configs", []):
            targets |= set(static["targets"])
    for name, var in ETL.items():
        port = services[name]["environment"][var].rsplit(":", 1)[1]
        if f"{name}:{port}" not in targets:
            problems.append(f"observability: Prometheus does not scrape {name}:{port}")
    exported = collector["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    if f"otel-collector:{exported}" not in targets:
        problems.append("observability: Prometheus does not scrape the collector's metrics")


default = resolved()
check_files("default", default)
check_demo(default)
observability = resolved("--profile", "observability")
check_files("observability", observability)
check_observability(observability)
own = resolved("-f", str(DEPLOY / "compose.secrets.yaml"))
check_files("own secrets", own)
for name, secret in own.get("secrets", {}).items():
    if not secret.get("file", "").startswith(str(DEPLOY / "secrets")):
        problems.append(f"own secrets: {name} is not read from deploy/secrets/")
for name in ("migrate", *ETL):
    if not own["services"][name]["environment"]["DATABASE_PASSWORD_FILE"].startswith("/run/secrets/"):
        problems.append(f"own secrets: {name} does not read the password from its secret")

if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
print("ok: compose: the demo as it is, secrets from files only, the observability profile wired")
