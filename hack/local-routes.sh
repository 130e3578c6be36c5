#!/usr/bin/env bash
# Keeps every packet for the local cluster's address ranges on this machine, while a local cluster runs.
# Without these routes the simulated pod IPs (kwok) and the Service IPs would be sent to the default gateway.
#   hack/local-routes.sh claim DIR       the cluster in DIR needs the routes: install them (replaced, never duplicated)
#   hack/local-routes.sh release DIR     it no longer does: drop its claim; with no live claim left, remove the
#                                        routes (only ours: they carry protocol $PROTO)
#   hack/local-routes.sh services TARGET where Service IPs go: `unreachable` (nothing serves them) or a device name
#                                        (the real node's bridge, where kube-proxy rewrites them)
#   hack/local-routes.sh check           fail unless both ranges are routed on this machine
# Needs root (CI and the development machines have it); without it, says plainly what it could not ensure.
set -euo pipefail
SERVICE_CIDR=10.0.0.0/24  # the API server's default Service range (kwokctl sets none)
SIM_POD_CIDR=10.245.0.0/16  # kwok-controller's --cidr (hack/kwok/kwokctl.yaml)
PROTO=245                 # tags our routes, so `release` removes exactly them
CLAIMS=/run/kiln/routes
log() { printf '[routes %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

root_or_warn() {
  if [ "$(id -u)" != 0 ]; then
    log "WARNING: not root: cannot route $SIM_POD_CIDR (simulated pods) and $SERVICE_CIDR (Services) on this" \
      "machine; traffic to those addresses would leave through the default route. Run as root."
    return 1
  fi
}

claim_file() { echo "$CLAIMS/$(printf '%s' "$1" | sha256sum | cut -c1-16)"; }

# A claim holds while its cluster's processes run (their command lines name the cluster's directory).
live_claims() {
  local f d
  for f in "$CLAIMS"/*; do
    [ -f "$f" ] || continue
    d=$(cat "$f")
    if pgrep -f -- "$d/" >/dev/null; then echo "$d"; else rm -f "$f"; fi
  done
}

install_routes() {
  ip route replace unreachable "$SIM_POD_CIDR" proto $PROTO
  # Keep a Service route that points at the real node's bridge; otherwise nothing serves Service IPs.
  if ! ip route show "$SERVICE_CIDR" proto $PROTO | grep -q ' dev '; then
    ip route replace unreachable "$SERVICE_CIDR" proto $PROTO
  fi
}

remove_routes() {
  local cidr
  for cidr in "$SIM_POD_CIDR" "$SERVICE_CIDR"; do
    while ip route show "$cidr" proto $PROTO | grep -q .; do
      ip route del "$cidr" proto $PROTO 2>/dev/null || ip route del unreachable "$cidr" proto $PROTO || break
    done
  done
}

check() {
  local ip out ok=0
  for ip in "${SIM_POD_CIDR%%/*}" "${SERVICE_CIDR%.*}.1"; do
    out=$(ip route get "$ip" 2>&1 || true)
    if [[ $out == *" via "* ]]; then log "$ip leaves this machine: $out"; ok=1; fi
  done
  return $ok
}

case ${1:-} in
  claim)
    dir=${2:?usage: $0 claim DIR}
    root_or_warn || exit 0
    mkdir -p "$CLAIMS"
    printf '%s' "$dir" >"$(claim_file "$dir")"
    install_routes
    log "routed locally: $SIM_POD_CIDR unreachable (simulated pods), $SERVICE_CIDR $(ip route show "$SERVICE_CIDR" proto $PROTO | awk '{print ($1 == "unreachable") ? "unreachable" : "dev " $3}') (Services)"
    ;;
  release)
    dir=${2:?usage: $0 release DIR}
    root_or_warn || exit 0
    rm -f "$(claim_file "$dir")"
    others=$(live_claims)
    if [ -n "$others" ]; then
      log "keeping the routes: still needed by $(tr '\n' ' ' <<<"$others")"
    else
      remove_routes
      rmdir "$CLAIMS" 2>/dev/null || true
    fi
    ;;
  services)
    target=${2:?usage: $0 services unreachable|DEVICE}
    root_or_warn || exit 0
    if [ "$target" = unreachable ]; then
      ip route replace unreachable "$SERVICE_CIDR" proto $PROTO
    else
      ip route replace "$SERVICE_CIDR" dev "$target" proto $PROTO
    fi
    ;;
  check) check ;;
  *) echo "usage: $0 claim DIR | release DIR | services unreachable|DEVICE | check" >&2; exit 2 ;;
esac
