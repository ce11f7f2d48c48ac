#!/usr/bin/env bash
# Java 17+ runs the local Kafka broker; Maven fetches it once. Chromium and its driver
# drive the dashboard's browser test (headless); Prometheus scrapes the stack's metrics
# (`recloop prometheus`, and its integration test). Install them when missing
# (Debian/Ubuntu, as root); otherwise say what to install.
set -euo pipefail
need=()
if ! command -v java >/dev/null 2>&1; then need+=(openjdk-17-jre-headless); fi
if ! command -v mvn >/dev/null 2>&1; then need+=(maven); fi
if ! command -v chromium >/dev/null 2>&1; then need+=(chromium); fi
if ! command -v chromedriver >/dev/null 2>&1; then need+=(chromium-driver); fi
if ! command -v prometheus >/dev/null 2>&1; then need+=(prometheus); fi
if [ ${#need[@]} -eq 0 ]; then
  echo "== system: $(java -version 2>&1 | head -1); $(mvn -v 2>/dev/null | head -1); $(chromium --version 2>/dev/null); $(prometheus --version 2>&1 | head -1)"
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "== system: installing ${need[*]} with apt-get"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
else
  echo "recloop needs ${need[*]}: Java 17+ and Maven for its local Kafka broker, Chromium" >&2
  echo "and chromium-driver for the dashboard's browser test, Prometheus for the metrics test." >&2
  echo "Install them, or point kafka.bootstrap_servers at a Kafka you already run." >&2
  exit 1
fi
