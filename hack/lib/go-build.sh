# Shared by hack/build-control-plane.sh and hack/build-node.sh (sourced, after LOG_PREFIX is set): the pinned
# versions, where binaries go, a Go environment that builds static binaries from the module proxy only, and the
# helpers both use. Not run on its own.
# shellcheck source=../versions.env
. "$(dirname "${BASH_SOURCE[0]}")/../versions.env"
KILN_CACHE=${KILN_CACHE:-$HOME/.cache/kiln}
BIN=${KILN_BIN_DIR:-$KILN_CACHE/bin}
SRC=$KILN_CACHE/src
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
mkdir -p "$BIN" "$SRC"
log() { printf '[%s %(%H:%M:%S)T] %s\n' "$LOG_PREFIX" -1 "$*"; }
reports() { # reports BINARY EXPECTED ARGS...: true when BINARY's output of ARGS contains EXPECTED
  local b=$1 want=$2 out; shift 2
  # Capture first: `| grep -q` under pipefail fails at random when grep exits early (SIGPIPE).
  [ -x "$BIN/$b" ] && out=$("$BIN/$b" "$@" 2>&1) && [[ $out == *"$want"* ]]
}
progress() { # progress WHAT COMMAND...: run COMMAND, saying every 30 s that it still runs
  local what=$1 t0=$SECONDS pid; shift
  "$@" & pid=$!
  while ! wait_tick "$pid"; do log "  ... $what: $((SECONDS - t0)) s"; done
  wait "$pid"
}
wait_tick() { # true once PID has exited (within 30 s), false if it still runs
  local i
  for i in $(seq 30); do kill -0 "$1" 2>/dev/null || return 0; sleep 1; done
  return 1
}
build_kubernetes() { # build_kubernetes DIR COMMAND...: k8s.io/kubernetes/cmd/COMMAND at K8S_VERSION into $BIN
  # A wrapper module in DIR with a replace line per staging module (generated from the release's go.mod), since
  # k8s.io/kubernetes requires them at v0.0.0; version stamped as release builds are.
  local d=$1 stg minor modfile m c ldf p; shift
  mkdir -p "$d"
  (
    cd "$d"
    [ -f go.mod ] || go mod init "local/$(basename "$d")" >/dev/null
    stg="v0.${K8S_VERSION#1.}"; minor=$(cut -d. -f2 <<<"$K8S_VERSION")
    log "resolving k8s.io/kubernetes@v$K8S_VERSION"
    modfile=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | python3 -c 'import json,sys;print(json.load(sys.stdin)["GoMod"])')
    for m in $(awk '$1 ~ /^k8s\.io\// && $2=="v0.0.0" {print $1}' "$modfile"); do
      go mod edit -replace="$m=$m@$stg"
    done
    for c in "$@"; do
      log "go get -tool $c"
      go get -tool "k8s.io/kubernetes/cmd/$c@v$K8S_VERSION"
    done
    ldf="-s -w"
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ldf+=" -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
      ldf+=" -X $p.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    done
    for c in "$@"; do
      log "go build $c"
      progress "$c" go build -trimpath -tags=selinux,notest,grpcnotrace -ldflags "$ldf" -o "$BIN/$c" "k8s.io/kubernetes/cmd/$c"
    done
  )
}
