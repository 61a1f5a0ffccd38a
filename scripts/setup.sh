#!/usr/bin/env bash
# Set-up on a fresh Debian 12 machine, then (unless --deps-only) a local 3-member cluster.
#
#   bash scripts/setup.sh               install everything, then `pgsidecar local up --nodes 3 --dir ./.local-cluster`
#   bash scripts/setup.sh --deps-only   install everything, start nothing (what the tests and CI use)
#
# Installs: PostgreSQL 15, pgBackRest, etcd, HAProxy, iproute2, Prometheus (for promtool) and
# postgres_exporter from Debian's packages; this package and its test dependencies with pip; the
# Apache Kafka jars from Maven Central (scripts/kafka.sh fetch); helm, built with Go from the Go
# module proxy when Go is there.
# Idempotent: a second run only checks.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
DEPS_ONLY=0
[[ ${1:-} == --deps-only ]] && DEPS_ONLY=1

SUDO=""
[[ $(id -u) -ne 0 ]] && SUDO=sudo

need_pkgs=()
[[ -x /usr/lib/postgresql/15/bin/postgres ]] || need_pkgs+=(postgresql-15 postgresql-client-15)
command -v pgbackrest >/dev/null || need_pkgs+=(pgbackrest)
command -v etcd >/dev/null || need_pkgs+=(etcd-server)
command -v etcdctl >/dev/null || need_pkgs+=(etcd-client)
command -v haproxy >/dev/null || need_pkgs+=(haproxy)
# PgBouncer in front of a local cluster (tests/e2e/test_pgbouncer.py; the Helm chart's pooler)
[[ -x /usr/sbin/pgbouncer ]] || need_pkgs+=(pgbouncer)
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v setpriv >/dev/null || need_pkgs+=(util-linux)
command -v java >/dev/null || need_pkgs+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need_pkgs+=(maven)
# promtool checks and unit-tests the alerting rules of deploy/monitoring; Debian ships it in the
# prometheus package (the server is not started: no service manager in containers, and the
# tests never run it)
command -v promtool >/dev/null || need_pkgs+=(prometheus)
# postgres_exporter (0.11 in Debian 12): the e2e test runs it against a live member as the
# monitoring role, to check every metric the rules and the dashboard use is exported; its
# service is not started either
command -v prometheus-postgres-exporter >/dev/null || need_pkgs+=(prometheus-postgres-exporter)
if ((${#need_pkgs[@]})); then
    echo "setup: installing Debian packages: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
# Debian's postgresql package may start a default cluster on 5432; we never use it, and our
# clusters pick free ports, so it is left alone.

PY=${PYTHON:-python3}
# The agents the tests start import pgsidecar from where pip installed it, not from here: another
# checkout installed on this machine earlier would be the code under test. So the package must be
# this checkout's (asked from / so that the current directory does not answer instead).
here=$(pwd -P)
installed=$(cd / && $PY -c "import os, pgsidecar; print(os.path.dirname(os.path.dirname(os.path.realpath(pgsidecar.__file__))))" 2>/dev/null || true)
if [ "$installed" != "$here" ] \
    || ! (cd / && $PY -c "import pytest, hypothesis, xdist, aiokafka, consul, kubernetes_asyncio, cronsim") 2>/dev/null \
    || ! command -v pgsidecar >/dev/null; then
    echo "setup: installing the Python package and its test dependencies"
    $PY -m pip install -q --disable-pip-version-check -e ".[test]"
    command -v pyenv >/dev/null && pyenv rehash || true
fi

if command -v java >/dev/null; then
    bash scripts/kafka.sh fetch
fi

# helm renders and lints deploy/helm/pgsidecar in the tests. No Debian package: `go install`
# builds the pinned release into $(go env GOPATH)/bin (about 2 minutes), which the tests also
# look in when it is not on PATH. Without Go, the chart's tests skip and say why.
HELM_VERSION=v3.21.4
if command -v go >/dev/null; then
    helm_bin="$(go env GOPATH)/bin/helm"
    if ! "$helm_bin" version --template '{{.Version}}' 2>/dev/null | grep -q "^${HELM_VERSION%.*}"; then
        echo "setup: building helm ${HELM_VERSION} with go install"
        go install "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
    fi
else
    echo "setup: Go is not installed: helm is not built and the Helm chart's tests will skip"
fi

if ((DEPS_ONLY)); then
    echo "setup: dependencies ready"
    exit 0
fi
exec $PY -m pgsidecar local up --nodes 3 --dir ./.local-cluster
