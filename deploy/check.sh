#!/usr/bin/env bash
# Checks the deploy files without a Docker engine or a helm binary (neither exists here):
#   - docker-compose config on compose.yaml, with each profile and the own-secrets override
#     (Compose's own parser and validation), and check_compose.py on what it resolves
#   - yamllint on every plain YAML file
#   - the Helm chart rendered offline by Helm's Go SDK (helm-python-sdk): helm lint --strict,
#     values.schema.json, and each rendered object against the Kubernetes schemas
# Not checked here: that the image builds and that the stack runs in Docker or Kubernetes.
# Python tools are pinned and installed from PyPI into target/deploytools.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v docker-compose >/dev/null; then
  if [ "${CI:-}" = true ] && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q docker-compose || (apt-get update -q && apt-get install -y -q docker-compose)) >/dev/null
  else
    echo "docker-compose is needed to check deploy/compose.yaml (Debian: apt-get install docker-compose)" >&2
    exit 1
  fi
fi
venv=target/deploytools
tools="helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 yamllint==1.38.0"
marker="$venv/installed-$(echo "$tools" | tr ' =' '-_')"
if [ ! -e "$marker" ]; then
  python3 -m venv --clear "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check $tools
  touch "$marker"
fi

docker-compose -f deploy/compose.yaml config --quiet
docker-compose -f deploy/compose.yaml --profile observability config --quiet
docker-compose -f deploy/compose.yaml -f deploy/compose.secrets.yaml config --quiet
echo "ok: deploy/compose.yaml, every profile and the own-secrets override (docker-compose config)"
"$venv/bin/python" deploy/check_compose.py
"$venv/bin/yamllint" --strict -c deploy/yamllint.yaml \
  deploy/compose.yaml deploy/compose.secrets.yaml deploy/observability/*.y*ml \
  deploy/helm/etl-platform/Chart.yaml deploy/helm/etl-platform/values.yaml
echo "ok: yamllint"
"$venv/bin/python" deploy/check_helm.py
