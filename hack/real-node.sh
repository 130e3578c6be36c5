#!/usr/bin/env bash
# One real node, kiln-real-0, in the local kwokctl cluster (hack/cluster.sh), beside its simulated kwok nodes:
# containerd, kubelet and kube-proxy run on this machine, with CoreDNS (cluster DNS for its pods, on the bridge's
# address) and local-path-provisioner (the default StorageClass `local-path`) as processes here too.
#   hack/real-node.sh up        start it (cleaning up first after a run that crashed); wait until the node is Ready
#   hack/real-node.sh down      delete its pods, stop everything it started, undo every change it made to the host
#   hack/real-node.sh status    whether it runs, and its processes
#   hack/real-node.sh snapshot  the host state it touches, normalized: compare one taken before `up` with one after `down`
#   hack/real-node.sh share CLAIM NAMESPACE...  a volume per namespace for the claim CLAIM there, all the same directory
#                               (StorageClass kiln-shared: the local stand-in for a shared file system); idempotent
# Settings: KILN_CLUSTER_NAME (default kiln), KWOK_WORKDIR (default <repo>/.kwok), KILN_CACHE, KILN_BIN_DIR.
# Needs root. One real node per machine: its ports (10250, ...), the bridge and /run/kiln-node are global.
#
# Layout: every file of the node (pki, configs, logs, pid files, kubelet root dir, CNI IPAM, volumes) is under
# $dir/real-node, so each of its processes names $dir/ in its command line (hack/cluster.sh and hack/test.sh find
# leftovers that way) and `hack/cluster.sh down` removes it with the cluster. Sockets and runtime state are under
# /run/kiln-node (short paths). containerd's image store is a cache shared by the clusters ($KILN_CACHE/containerd):
# images are imported once; nothing that runs is kept in it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=versions.env
. "$repo/hack/versions.env"
KILN_CACHE=${KILN_CACHE:-$HOME/.cache/kiln}
BIN=${KILN_BIN_DIR:-$KILN_CACHE/bin}
NAME=${KILN_CLUSTER_NAME:-kiln}
KWOK_WORKDIR=${KWOK_WORKDIR:-$repo/.kwok}
dir=$KWOK_WORKDIR/clusters/$NAME
ADMIN=$dir/kubeconfig.yaml
NODE=$dir/real-node
RUN=/run/kiln-node
ORIG=$RUN/orig  # the host's state before `up` (in /run: it outlives the cluster's dir, and a reboot resets both)
SOCK=$RUN/containerd/containerd.sock
CONTAINERD_ROOT=$KILN_CACHE/containerd/root
CTR=$BIN/containerd2/ctr
NODE_NAME=kiln-real-0
BRIDGE=kiln0 POD_CIDR=10.244.0.0/24 POD_GW=10.244.0.1
SERVICE_CIDR=$(sed -n 's/^SERVICE_CIDR=\([^ ]*\).*/\1/p' "$repo/hack/local-routes.sh")  # routed by that script
CLUSTER_DNS=$POD_GW  # CoreDNS listens on the bridge's address: reachable from every pod, from nothing off the machine
PAUSE_IMAGE=kiln.local/pause:$PAUSE_VERSION
DEBIAN_IMAGE=kiln.local/debian-python:bookworm
COMPONENTS=(containerd kubelet kube-proxy coredns local-path-provisioner)
export PATH=$BIN:$PATH

log() { printf '[node %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
k() { kubectl --kubeconfig "$ADMIN" --request-timeout=10s "$@"; }
ctr_() { "$CTR" --address "$SOCK" "$@"; }
crictl_() { crictl --runtime-endpoint "unix://$SOCK" --image-endpoint "unix://$SOCK" --timeout 30s "$@"; }
since() { # since EPOCHREALTIME: seconds elapsed, one decimal
  local now=$EPOCHREALTIME d
  d=$((${now//[.,]/} - ${1//[.,]/}))
  printf '%d.%d' $((d / 1000000)) $((d % 1000000 / 100000))
}
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds or time runs out
  local until=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= until)); then log "timed out waiting for $what"; return 1; fi
    sleep 0.2
  done
}
live() { # live PID: true while PID runs (not a zombie: this machine's init may take seconds to reap one)
  local st
  st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) && [ "${st:0:1}" != Z ]
}
pid_of() { # pid_of COMPONENT: its PID while it runs (checked against its command line: PIDs are reused)
  local p
  p=$(cat "$NODE/pids/$1.pid" 2>/dev/null) && live "$p" && tr '\0' ' ' <"/proc/$p/cmdline" | grep -qF -- "$NODE/" && echo "$p"
}
start() { # start COMPONENT COMMAND...: in the background, in a session of its own; log and PID under $NODE
  local name=$1; shift
  setsid "$@" >"$NODE/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$NODE/pids/$name.pid"
  log "started $name (pid $!, log $NODE/logs/$name.log)"
}
stop() { # stop COMPONENT: SIGTERM, SIGKILL after 20 s
  local name=$1 p
  if p=$(pid_of "$name"); then
    log "stopping $name (pid $p)"
    kill "$p" 2>/dev/null || true
    wait_for 20 "$name to exit" eval "! live $p" || kill -9 "$p" 2>/dev/null || true
  fi
  rm -f "$NODE/pids/$name.pid"
}
alive() { # alive COMPONENT: true while it runs (says which one stopped otherwise)
  pid_of "$1" >/dev/null || { log "$1 exited; the end of $NODE/logs/$1.log:"; tail -n 20 "$NODE/logs/$1.log" >&2; return 1; }
}

deps() { # Debian packages the node uses; installed when missing
  local p missing=()
  for p in runc containernetworking-plugins nftables iptables conntrack openssl curl; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} (Debian)"
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
  local b
  for b in kubelet kube-proxy crictl coredns local-path-provisioner "pause-$PAUSE_VERSION" containerd2/containerd \
    containerd2/ctr containerd2/containerd-shim-runc-v2; do
    [ -x "$BIN/$b" ] && continue
    log "$BIN/$b is missing: building the node's programs"
    "$repo/hack/build-node.sh" >&2
    break
  done
}

node_ip() { # the address of the interface of the default route (the kubelet's InternalIP)
  local dev
  dev=$(ip -4 route show default | awk '{for (i = 1; i < NF; i++) if ($i == "dev") {print $(i + 1); exit}}')
  [ -n "$dev" ] || die "no default route: cannot choose the node's address"
  ip -4 -o addr show dev "$dev" scope global | awk '{split($4, a, "/"); print a[1]; exit}'
}

render() { # render TEMPLATE OUT [KEY=VALUE...]: hack/node/TEMPLATE with its @PLACEHOLDERS@ filled in
  local src=$repo/hack/node/$1 out=$2 kv args=(); shift 2
  for kv in "NODE=$NODE" "RUN=$RUN" "BRIDGE=$BRIDGE" "POD_CIDR=$POD_CIDR" "POD_GW=$POD_GW" "CLUSTER_DNS=$CLUSTER_DNS" \
    "NODE_NAME=$NODE_NAME" "PAUSE_IMAGE=$PAUSE_IMAGE" "CONTAINERD_ROOT=$CONTAINERD_ROOT" "$@"; do
    args+=(-e "s#@${kv%%=*}@#${kv#*=}#g")
  done
  sed "${args[@]}" "$src" >"$out"
  if grep -q '@[A-Z_]*@' "$out"; then die "unfilled placeholder in $out: $(grep -o '@[A-Z_]*@' "$out" | head -1)"; fi
}

pki() { # client and serving certificates signed by the cluster's CA, and a kubeconfig per client
  local ip=$1 server
  server=$(k config view --minify --raw -o jsonpath='{.clusters[0].cluster.server}')
  cp "$dir/pki/ca.crt" "$NODE/pki/ca.crt"
  cert() { # cert NAME SUBJECT EXTENSIONS
    local p=$NODE/pki/$1
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$p.key" -subj "$2" \
      -out "$p.csr" 2>/dev/null
    # A random serial rather than -CAcreateserial, which would write a file into the cluster's pki dir.
    openssl x509 -req -in "$p.csr" -CA "$dir/pki/ca.crt" -CAkey "$dir/pki/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
      -days 365 -extfile <(printf '%s\n' "$3") -out "$p.crt" 2>/dev/null
    rm -f "$p.csr"
  }
  kubeconfig() { # kubeconfig NAME: a kubeconfig for the client certificate NAME
    cat >"$NODE/pki/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: kiln
  cluster: {server: "$server", certificate-authority: "$NODE/pki/ca.crt"}
users:
- name: $1
  user: {client-certificate: "$NODE/pki/$1.crt", client-key: "$NODE/pki/$1.key"}
contexts:
- name: kiln
  context: {cluster: kiln, user: $1}
current-context: kiln
EOF
  }
  # The kubelet as a node: the Node authorizer and NodeRestriction admission apply to it.
  cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" "extendedKeyUsage=clientAuth"
  # kube-proxy: bound to system:node-proxier by the cluster's default ClusterRoleBinding.
  cert kube-proxy "/CN=system:kube-proxy" "extendedKeyUsage=clientAuth"
  # CoreDNS and local-path-provisioner: users with their own read-only / provisioning rules (hack/node/cluster-objects.yaml).
  cert coredns "/CN=kiln:coredns" "extendedKeyUsage=clientAuth"
  cert local-path-provisioner "/CN=kiln:local-path-provisioner" "extendedKeyUsage=clientAuth"
  cert kubelet-serving "/CN=$NODE_NAME" "extendedKeyUsage=serverAuth
subjectAltName=DNS:$NODE_NAME,IP:$ip"
  for c in kubelet kube-proxy coredns local-path-provisioner; do kubeconfig "$c"; done
}

nft_tables() { nft list tables 2>/dev/null | sort || true; }

net_up() { # the bridge, Services routed to it, and no forwarding of pod traffic anywhere but the bridge
  sysctl -n net.ipv4.ip_forward >"$ORIG/ip_forward"  # the bridge plugin (isGateway) turns forwarding on
  nft_tables >"$ORIG/nft-tables"
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$POD_GW/${POD_CIDR#*/}" dev "$BRIDGE"
    ip link set "$BRIDGE" up
  fi
  # Service IPs go to the bridge, where kube-proxy rewrites them (and those it does not go nowhere else).
  "$repo/hack/local-routes.sh" services "$BRIDGE"
  # Pods reach each other, this host and Services on it; nothing they send is forwarded off the machine.
  iptables -C FORWARD -s "$POD_CIDR" ! -o "$BRIDGE" -j DROP -m comment --comment kiln-real-node 2>/dev/null ||
    iptables -I FORWARD 1 -s "$POD_CIDR" ! -o "$BRIDGE" -j DROP -m comment --comment kiln-real-node
}

net_down() {
  while iptables -D FORWARD -s "$POD_CIDR" ! -o "$BRIDGE" -j DROP -m comment --comment kiln-real-node 2>/dev/null; do :; done
  # Service IPs back to `unreachable` (the cluster's own teardown removes that route); when the cluster is gone
  # already, its claim on the routes is dropped too.
  if [ -d "$dir" ] || ip route show "$SERVICE_CIDR" proto 245 2>/dev/null | grep -q "dev $BRIDGE"; then
    "$repo/hack/local-routes.sh" services unreachable
    [ -d "$dir" ] || "$repo/hack/local-routes.sh" release "$dir"
  fi
  local v
  for v in $(ip -o link show master "$BRIDGE" 2>/dev/null | awk -F'[:@ ]+' '{print $2}'); do ip link del "$v" 2>/dev/null || true; done
  ip link del "$BRIDGE" 2>/dev/null || true
  # Tables created while the node ran (iptables-nft makes ip/ip6 filter, nat, ...; kube-proxy its own, removed by
  # its --cleanup): dropped when empty; tables that were there before are left as they are.
  local t fam name
  while read -r t fam name; do
    [ "$t" = table ] || continue
    grep -qx "table $fam $name" "$ORIG/nft-tables" 2>/dev/null && continue
    # Empty: no line at rule depth other than the chains' own "type ... policy ..." lines.
    nft list table "$fam" "$name" 2>/dev/null | grep -P '^\t\t' | grep -qvP '^\t\t(type|policy) ' ||
      nft delete table "$fam" "$name" 2>/dev/null || true
  done < <(nft_tables)
  if [ -f "$ORIG/ip_forward" ]; then sysctl -qw net.ipv4.ip_forward="$(cat "$ORIG/ip_forward")"; fi
}

purge_runtime() { # remove every pod sandbox and container (and so their snapshots) from containerd, through the CRI
  local pods ns c
  pods=$(crictl_ pods -q 2>/dev/null || true)
  if [ -n "$pods" ]; then
    log "removing $(wc -w <<<"$pods") pod sandbox(es) and their containers"
    # rmp -f stops each pod (network teardown through the CNI) and removes it with its containers.
    crictl_ rmp -f $pods >/dev/null 2>&1 || crictl_ rmp -fa >&2 || true
  fi
  # Anything else (containers made with ctr, in any namespace): task killed, container and snapshot removed.
  for ns in $(ctr_ namespaces ls -q 2>/dev/null); do
    for c in $(ctr_ -n "$ns" containers ls -q 2>/dev/null); do
      log "removing container $ns/$c"
      ctr_ -n "$ns" tasks kill -s SIGKILL "$c" >/dev/null 2>&1 || true
      ctr_ -n "$ns" tasks delete -f "$c" >/dev/null 2>&1 || true
      ctr_ -n "$ns" containers delete "$c" >/dev/null 2>&1 || true
    done
    # Writable snapshots no container owns any more (image layers are committed snapshots, and stay).
    for c in $(ctr_ -n "$ns" snapshots ls 2>/dev/null | awk '$NF == "Active" {print $1}'); do
      ctr_ -n "$ns" snapshots rm "$c" >/dev/null 2>&1 || true
    done
  done
}

import_image() { # import_image NAME OCI-IMAGE-ARGS...: make the image here and import it, unless containerd has it
  local name=$1 tar; shift
  [ -n "$(ctr_ -n k8s.io images ls -q "name==$name" 2>/dev/null)" ] && return 0
  tar=$NODE/tmp/image.tar
  python3 "$repo/hack/node/oci-image.py" --out "$tar" --name "$name" "$@"
  ctr_ -n k8s.io images import "$tar" >/dev/null
  rm -f "$tar"
  log "imported $name"
}

helper_image() { # the image of local-path-provisioner's helper pods: needs sh, mkdir and rm, and must be here
  if [ -n "$(ctr_ -n k8s.io images ls -q "name==$DEBIAN_IMAGE" 2>/dev/null)" ]; then
    echo "$DEBIAN_IMAGE"
    return
  fi
  # Without the images of hack/images.sh: a three-command image from Debian's static busybox.
  if ! dpkg -s busybox-static >/dev/null 2>&1; then
    log "installing busybox-static (Debian), for local-path-provisioner's helper image"
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox-static >&2
  fi
  local v
  v=$(dpkg-query -W -f '${Version}' busybox-static | sed 's/^[0-9]*://; s/[^A-Za-z0-9_.-]/_/g')
  import_image "kiln.local/busybox:$v" --file bin/busybox=/bin/busybox --symlink bin/sh=busybox \
    --symlink bin/mkdir=busybox --symlink bin/rm=busybox
  echo "kiln.local/busybox:$v"
}

node_ready() { [ "$(k get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}')" = True ]; }

running() { # true when every component of this cluster's node runs and the node is Ready
  local c
  for c in "${COMPONENTS[@]}"; do pid_of "$c" >/dev/null || return 1; done
  node_ready 2>/dev/null
}

other_node() { # the cluster dir of a real node of another cluster that still runs on this machine
  local owner
  owner=$(cat "$RUN/owner" 2>/dev/null) || return 1
  [ "$owner" != "$dir" ] && pgrep -f -- "$owner/real-node/" >/dev/null && echo "$owner"
}

ports_in_use() { # the node's fixed ports that something else listens on
  local p
  for p in 10250 10248 10249 10256 8181; do
    ss -Hltn "sport = :$p" 2>/dev/null | grep -q . && echo "$p"
  done
  true
}

up() {
  local t_up=$EPOCHREALTIME t0 ip other ports helper
  [ "$(id -u)" = 0 ] || die "the real node needs root (network, cgroups, mounts)"
  [ -f "$ADMIN" ] && [ -f "$dir/pki/ca.key" ] || die "no cluster in $dir: run hack/cluster.sh up"
  k get --raw /readyz >/dev/null || die "the API server of $dir does not answer"
  if other=$(other_node); then
    die "a real node already runs on this machine, for the cluster in $other (one per machine: its ports and the" \
      "bridge $BRIDGE are global). Stop it first: KWOK_WORKDIR=${other%/clusters/*} KILN_CLUSTER_NAME=${other##*/} $0 down"
  fi
  if running; then
    log "real node $NODE_NAME is already up ($NODE)"
    return 0
  fi
  if [ -e "$RUN" ] || [ -d "$NODE/pids" ] || ip link show "$BRIDGE" >/dev/null 2>&1; then
    log "cleaning up after a previous run"
    down
  fi
  ports=$(ports_in_use)
  [ -z "$ports" ] || die "port(s) $(echo $ports) already in use on this machine (another kubelet?): $(ss -Hltnp | grep -E ":($(echo $ports | tr ' ' '|'))\b" | head -3)"
  deps
  mkdir -p "$NODE"/{etc/cni/net.d,etc/certs.d/_default,pki,pids,logs,bin,kubelet,volumes,tmp,local-path} "$RUN" "$ORIG" \
    "$CONTAINERD_ROOT"
  chmod 700 "$NODE/pki"
  echo "$dir" >"$RUN/owner"
  # Directories made outside the node's own whatever the configuration says (libcni's result cache /var/lib/cni; the
  # kubelet's device plugin socket, at a fixed path under /var/lib/kubelet), and a few that containerd or the kubelet
  # would make by default: removed at `down` if they were not there before.
  local d
  : >"$ORIG/created-dirs"
  for d in /run/containerd /run/netns /run/nri /var/lib/cni /etc/cni /opt/containerd /var/lib/kubelet \
    /var/lib/kubelet/device-plugins; do
    [ -e "$d" ] || echo "$d" >>"$ORIG/created-dirs"
  done
  ip=$(node_ip)
  log "real node $NODE_NAME: address $ip, pods $POD_CIDR on $BRIDGE, DNS $CLUSTER_DNS, state in $NODE"

  pki "$ip"
  render containerd.toml "$NODE/etc/containerd.toml"
  render hosts.toml "$NODE/etc/certs.d/_default/hosts.toml"
  # CNI: pods on the bridge with addresses from $POD_CIDR (IPAM state under $NODE); no masquerading, so nothing
  # they send can leave the machine; hairpin so that a pod reaches itself through its Service; portmap for hostPort.
  render 10-kiln.conflist "$NODE/etc/cni/net.d/10-kiln.conflist"
  render kubelet.yaml "$NODE/etc/kubelet.yaml" "NODE_IP=$ip"
  render kube-proxy.yaml "$NODE/etc/kube-proxy.yaml" "NODE_IP=$ip"
  render Corefile "$NODE/etc/Corefile"
  # The shim runs from the node's dir, so that its command line names the cluster (see containerd.toml).
  ln -f "$BIN/containerd2/containerd-shim-runc-v2" "$NODE/bin/" 2>/dev/null ||
    cp "$BIN/containerd2/containerd-shim-runc-v2" "$NODE/bin/"
  net_up

  t0=$EPOCHREALTIME
  start containerd "$BIN/containerd2/containerd" --config "$NODE/etc/containerd.toml"
  wait_for 60 "containerd" ctr_ version || { alive containerd; die "containerd did not start"; }
  log "containerd v$CONTAINERD_VERSION up in $(since "$t0") s"
  purge_runtime  # a run that crashed may have left pods in the image store's metadata
  import_image "$PAUSE_IMAGE" --file pause="$BIN/pause-$PAUSE_VERSION" --entrypoint /pause --user 65535:65535
  if [ -x "$repo/hack/images.sh" ]; then
    t0=$EPOCHREALTIME
    log "loading Kiln's images (hack/images.sh load)"
    if KILN_CONTAINERD_ADDRESS=$SOCK KILN_CTR=$CTR "$repo/hack/images.sh" load >&2; then
      log "images loaded in $(since "$t0") s"
    else
      log "WARNING: hack/images.sh load failed (exit $?): pods of Kiln's images will fail with ErrImageNeverPull/ErrImagePull"
    fi
  fi

  t0=$EPOCHREALTIME
  start kubelet "$BIN/kubelet" --config "$NODE/etc/kubelet.yaml" --kubeconfig "$NODE/pki/kubelet.kubeconfig" \
    --root-dir "$NODE/kubelet" --cert-dir "$NODE/kubelet/pki" --hostname-override "$NODE_NAME" --node-ip "$ip" \
    --node-labels kiln.dev/node-kind=real --v 2
  local until=$((SECONDS + 120))
  until node_ready 2>/dev/null; do
    alive kubelet || die "kubelet did not start"
    ((SECONDS < until)) || die "node $NODE_NAME not Ready after 120 s (see $NODE/logs/kubelet.log)"
    sleep 0.2
  done
  log "node $NODE_NAME Ready $(since "$t0") s after the kubelet started"

  t0=$EPOCHREALTIME
  start kube-proxy "$BIN/kube-proxy" --config "$NODE/etc/kube-proxy.yaml" --v 2
  wait_for 60 "kube-proxy" curl -sf --max-time 2 http://127.0.0.1:10256/healthz || { alive kube-proxy; die "kube-proxy not healthy"; }
  log "kube-proxy (nftables) healthy $(since "$t0") s after start"

  # The identities and rules of CoreDNS and local-path-provisioner, and the default StorageClass.
  k apply -f "$repo/hack/node/cluster-objects.yaml" >/dev/null
  helper=$(helper_image)
  render local-path/config.json "$NODE/local-path/config.json"
  render local-path/helperPod.yaml "$NODE/local-path/helperPod.yaml" "HELPER_IMAGE=$helper"
  # The helper pods mount setup and teardown from this ConfigMap (local-path-provisioner's contract).
  k create configmap local-path-config -n local-path-storage --dry-run=client -o yaml \
    --from-file=setup="$repo/hack/node/local-path/setup" --from-file=teardown="$repo/hack/node/local-path/teardown" \
    --from-file=config.json="$NODE/local-path/config.json" --from-file=helperPod.yaml="$NODE/local-path/helperPod.yaml" |
    k apply -f - >/dev/null

  t0=$EPOCHREALTIME
  start coredns "$BIN/coredns" -conf "$NODE/etc/Corefile"
  wait_for 60 "CoreDNS" curl -sf --max-time 2 http://127.0.0.1:8181/ready || { alive coredns; die "CoreDNS not ready"; }
  log "CoreDNS ready on $CLUSTER_DNS:53 $(since "$t0") s after start"

  start local-path-provisioner "$BIN/local-path-provisioner" --debug start --kubeconfig "$NODE/pki/local-path-provisioner.kubeconfig" \
    --namespace local-path-storage --service-account-name local-path-helper --helper-image "$helper" \
    --config "$NODE/local-path/config.json" --helper-pod-file "$NODE/local-path/helperPod.yaml"
  wait_for 30 "local-path-provisioner" grep -q 'Started provisioner controller' "$NODE/logs/local-path-provisioner.log" ||
    { alive local-path-provisioner; die "local-path-provisioner did not start"; }
  log "local-path-provisioner running (StorageClass local-path, default; helper image $helper)"
  # The kubelet's first try at its Lease comes before its Node exists and fails; it tries again one renew interval
  # (5 s, kubelet.yaml) later. Waiting for it here means that whoever uses the node next finds it complete.
  wait_for 30 "the node's Lease" eval '[ "$(k get lease -n kube-node-lease "$NODE_NAME" -o jsonpath="{.spec.holderIdentity}")" = "$NODE_NAME" ]' ||
    log "WARNING: the kubelet holds no Lease yet"
  log "real node $NODE_NAME up in $(since "$t_up") s"
}

down() {
  local t0=$EPOCHREALTIME have_api=0 p m h d other c
  [ "$(id -u)" = 0 ] || die "the real node needs root"
  if other=$(other_node); then
    # The machine's node belongs to another cluster: its host state is not ours to undo.
    log "this machine's real node belongs to the cluster in $other: leaving it; stopping only what $NODE started"
    for c in "${COMPONENTS[@]}"; do stop "$c"; done
    rm -rf "$NODE/pids"
    return 0
  fi
  # Without a record from `up` (it crashed before writing one): the tables as they are now are the baseline.
  if [ ! -f "$ORIG/nft-tables" ]; then mkdir -p "$ORIG" && nft_tables >"$ORIG/nft-tables"; fi
  if [ -f "$ADMIN" ] && k get node "$NODE_NAME" >/dev/null 2>&1; then have_api=1; fi
  stop local-path-provisioner
  if [ $have_api = 1 ]; then
    # Cordoned first, so that controllers do not place the replacements of its pods on it again.
    k cordon "$NODE_NAME" >/dev/null 2>&1 || true
    if pid_of kubelet >/dev/null; then
      log "deleting the pods on $NODE_NAME"
      kubectl --kubeconfig "$ADMIN" delete pods -A --field-selector "spec.nodeName=$NODE_NAME" --grace-period=5 \
        --wait=true --timeout=60s >/dev/null 2>&1 || log "WARNING: not all pods on $NODE_NAME went in time"
    else
      # No kubelet to stop them gracefully and confirm: their containers are removed below.
      log "deleting the pods on $NODE_NAME (its kubelet is not running: at once)"
      kubectl --kubeconfig "$ADMIN" delete pods -A --field-selector "spec.nodeName=$NODE_NAME" --grace-period=0 \
        --force --wait=false >/dev/null 2>&1 || true
    fi
  fi
  stop coredns
  stop kube-proxy
  "$BIN/kube-proxy" --cleanup --proxy-mode nftables >/dev/null 2>&1 || true
  stop kubelet
  if pid_of containerd >/dev/null; then purge_runtime; fi
  stop containerd
  # Processes of this node whose PID file is gone, and shims of the node's containerd (whatever cluster started it);
  # shims of removed pods exit on their own within a moment.
  leftover() { { pgrep -f -- "$NODE/"; pgrep -f -- "-address $SOCK"; } | sort -u; }
  wait_for 5 "shims to exit" test -z "$(leftover)" || true
  for p in $(leftover); do
    [ "$p" != $$ ] && kill -9 "$p" 2>/dev/null && log "killed leftover process $p" || true
  done
  # Container processes whose shim is gone: everything left in the node's pod cgroups.
  for p in $(find /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u); do
    kill -9 "$p" 2>/dev/null && log "killed leftover container process $p" || true
  done
  # Mounts left under the node's dirs (volumes, container root filesystems, network namespaces), deepest first.
  for m in $(awk -v a="$NODE/" -v b="$RUN/" -v c="$CONTAINERD_ROOT/" \
    'index($5, a) == 1 || index($5, b) == 1 || index($5, c) == 1 {print $5}' /proc/self/mountinfo | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  # The pod cgroups, deepest first, in every hierarchy (k8s.io: containers started with ctr).
  for h in /sys/fs/cgroup /sys/fs/cgroup/*/; do
    for d in "$h/kubepods" "$h/k8s.io"; do
      [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
      [ -d "$d" ] && log "WARNING: could not remove cgroup $d"
    done
  done
  net_down
  if [ -f "$ORIG/created-dirs" ]; then
    while read -r d; do rm -rf --one-file-system "$d"; done <"$ORIG/created-dirs"
  fi
  rm -rf --one-file-system "$RUN"
  rm -rf "$NODE/pids" "$NODE/cni-ipam" "$NODE/tmp"
  if [ $have_api = 1 ]; then k delete node "$NODE_NAME" --ignore-not-found >/dev/null 2>&1 || true; fi
  log "real node $NODE_NAME down in $(since "$t0") s"
}

status() {
  local c p rc=0 owner
  owner=$(cat "$RUN/owner" 2>/dev/null || true)
  if [ -n "$owner" ] && [ "$owner" != "$dir" ]; then echo "this machine's real node belongs to the cluster in $owner"; fi
  for c in "${COMPONENTS[@]}"; do
    if p=$(pid_of "$c"); then echo "$c: running (pid $p)"; else echo "$c: not running"; rc=1; fi
  done
  if [ -f "$ADMIN" ] && node_ready 2>/dev/null; then echo "node $NODE_NAME: Ready"; else echo "node $NODE_NAME: not Ready"; rc=1; fi
  return $rc
}

share() { # share CLAIM NAMESPACE...: pre-bound hostPath volumes, one per namespace, of one directory on the node
  local claim=${1:?usage: $0 share CLAIM NAMESPACE...} ns
  shift
  [[ $claim =~ ^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$ ]] || die "share: claim name $claim: must be a DNS label"
  [ -f "$ADMIN" ] || die "share: no cluster in $dir"
  # Writable by every pod's non-root user, as local-path-provisioner's volumes are (hack/node/local-path/setup).
  mkdir -p -m 0777 "$NODE/volumes/shared/$claim"
  chmod 0777 "$NODE/volumes/shared/$claim"
  for ns in "$@"; do
    k apply -f - >/dev/null <<YAML
apiVersion: v1
kind: PersistentVolume
metadata:
  name: $claim-$ns
  labels: {kiln.dev/shared-claim: $claim}
spec:
  storageClassName: kiln-shared
  capacity: {storage: 20Gi}
  accessModes: [ReadWriteOnce, ReadWriteMany]
  persistentVolumeReclaimPolicy: Retain
  claimRef: {namespace: $ns, name: $claim}
  hostPath: {path: $NODE/volumes/shared/$claim, type: Directory}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [$NODE_NAME]}]
YAML
    log "volume $claim-$ns: claim $ns/$claim is $NODE/volumes/shared/$claim (StorageClass kiln-shared)"
  done
}

snapshot() { # what the node may change on the host, in a stable form (diff one before `up` with one after `down`)
  set +e +o pipefail  # a listing that finds nothing is not an error here
  echo "## links"; ip -o link show | awk '{sub(/@[^:]*:$/, ":", $2); print $2, $3}'
  echo "## addresses"; ip -o addr show | awk '{print $2, $3, $4}'
  # Routes tagged 245 belong to hack/local-routes.sh (they follow the cluster, not the node).
  echo "## routes"; { ip -4 route show table all; ip -6 route show table all; } | grep -v 'proto 245' | sed -E 's/ expires [0-9]+sec//'
  echo "## rules"; ip rule show; ip -6 rule show
  echo "## netns"; ip netns list 2>/dev/null
  echo "## sysctl"; sysctl net.ipv4.ip_forward net.ipv4.conf.all.forwarding net.ipv4.conf.all.route_localnet net.ipv6.conf.all.forwarding 2>/dev/null
  echo "## nft"; nft list ruleset 2>/dev/null | sed -E 's/counter packets [0-9]+ bytes [0-9]+/counter/'
  echo "## iptables"; iptables-save 2>/dev/null | grep -v '^#' | sed -E 's/\[[0-9]+:[0-9]+\]/[0:0]/'
  echo "## ip6tables"; ip6tables-save 2>/dev/null | grep -v '^#' | sed -E 's/\[[0-9]+:[0-9]+\]/[0:0]/'
  echo "## mounts"; awk '{for (i = 7; i <= NF; i++) if ($i == "-") {print $5, $(i + 1), $(i + 2); break}}' /proc/self/mountinfo | sort
  echo "## cgroups"; find /sys/fs/cgroup /sys/fs/cgroup/*/ -maxdepth 1 -type d \( -name 'kubepods*' -o -name k8s.io \) 2>/dev/null | sort
  echo "## dirs"
  local d
  for d in /run/containerd /run/netns /run/nri /run/kiln-node /var/lib/cni /etc/cni /opt/containerd /var/lib/containerd \
    /var/lib/kubelet /var/log/pods /etc/kubernetes; do
    if [ -e "$d" ]; then find "$d" -maxdepth 2 | sort; else echo "$d: absent"; fi
  done
  # Zombies are left out: this machine's init takes seconds to reap a process that has exited.
  echo "## processes"
  ps -eo stat=,comm=,args= | awk '$1 !~ /^Z/ && $2 ~ /^(containerd|containerd-shim|kubelet|kube-proxy|coredns|local-path-prov|pause|runc)$/ {$1 = ""; print}' | sort
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  snapshot) snapshot ;;
  share) shift; share "$@" ;;
  *) echo "usage: $0 up|down|status|snapshot|share CLAIM NAMESPACE..." >&2; exit 2 ;;
esac
