#!/usr/bin/env bash
# Kiln's container images, built on this machine without any registry, and loaded into a local containerd.
#   hack/images.sh build [NAME...]  the base image, then images/NAME/Dockerfile as kiln/NAME:<version> (default: all)
#   hack/images.sh load [NAME...]   import the built images that containerd lacks or has in another version
#   hack/images.sh sizes            each image's size, and the disk the builder's storage takes
# NAME: operator, trainer, compressor, server. <version> is the project's (pyproject.toml): the tag manifests/ and
# the operator's defaults use.
#
# The base: `FROM python:3.11-slim` cannot be pulled here, so a debootstrapped Debian bookworm (the release
# python:3.11-slim is made from) with Debian's Python 3.11 stands in for it: kiln.local/debian-python:bookworm,
# also tagged python:3.11-slim in the builder's own storage. The server's CUDA base becomes the same image: a
# CPU-only server on Debian's Python. Each Dockerfile is built unchanged (it builds with `docker build` too).
# Cached: debootstrap runs when the base is missing or its recipe changed; buildah's layer cache does the rest.
#
# Settings:
#   KILN_CACHE (default ~/.cache/kiln): buildah's storage is $KILN_CACHE/buildah; nothing stays in /var/lib/containers
#   KILN_DEBIAN_MIRROR (default: the first URI of /etc/apt/sources.list.d/debian.sources, else deb.debian.org)
#   KILN_CA_BUNDLE (default /etc/ssl/certs/ca-certificates.crt) and /etc/pip.conf: mounted read-only into every
#     build step, so pip reaches PyPI the way this machine does (neither is stored in an image)
#   load: KILN_CONTAINERD_ADDRESS (containerd's socket) and KILN_CTR (its ctr binary); images go to namespace k8s.io
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
KILN_CACHE=${KILN_CACHE:-$HOME/.cache/kiln}
store=$KILN_CACHE/buildah
ALL=(operator trainer compressor server)
VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
BASE=kiln.local/debian-python:bookworm
SUITE=bookworm
CA_BUNDLE=${KILN_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

log() { printf '[images %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
secs() { printf '%d.%d s' $(($1 / 1000)) $(($1 % 1000 / 100)); }  # secs MILLISECONDS
now_ms() { date +%s%3N; }

# --- buildah, confined to $KILN_CACHE -------------------------------------------------------------------------
# Its storage under --root/--runroot; its temporary files under $store/tmp; its CNI configuration dir (buildah
# creates a lock file there even when no step uses CNI) under $store/cni. Every step runs with --network host
# (bud) or none, so buildah never sets up a network of its own. The one path that no setting moves is the blob
# info cache in /var/lib/containers/cache: removed on exit unless it was there before.
B() {
  TMPDIR=$store/tmp CONTAINERS_CONF=$store/containers.conf \
    buildah --root "$store/root" --runroot "$store/run" --storage-driver overlay "$@"
}
host_paths=(/var/lib/containers/cache /var/lib/containers /etc/cni/net.d/cni.lock /etc/cni/net.d /etc/cni /run/runc)
declare -A existed=()
for p in "${host_paths[@]}"; do [ ! -e "$p" ] || existed[$p]=1; done
restore_host() { # remove what buildah created outside $KILN_CACHE (deepest first; directories only when empty)
  local p
  for p in "${host_paths[@]}"; do
    [ -z "${existed[$p]:-}" ] && [ -e "$p" ] || continue
    case $p in
      /var/lib/containers/cache | *.lock) rm -rf "$p" ;;
      *) rmdir "$p" 2>/dev/null || true ;;
    esac
  done
}

setup() {
  [ "$(id -u)" = 0 ] || die "needs root (debootstrap, and buildah's overlay storage)"
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  # buildah only recommends an OCI runtime, and RUN steps need one.
  command -v runc >/dev/null || command -v crun >/dev/null || missing+=(runc)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  if ((${#missing[@]})); then
    log "installing ${missing[*]} from Debian (apt-get)"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
  mkdir -p "$store/tmp" "$store/cni"
  printf '[network]\nnetwork_config_dir = "%s"\n' "$store/cni" >"$store/containers.conf"
  trap restore_host EXIT
  # One build at a time: two would race on the tags and on the host paths above.
  exec 9>"$store/lock"
  flock -n 9 || { log "waiting for another hack/images.sh to finish"; flock 9; }
}

image_id() { B inspect --type image --format '{{.FromImageID}}' "$1" 2>/dev/null || true; }  # empty when absent

# --- the base image -----------------------------------------------------------------------------------------
mirror() {
  local m=${KILN_DEBIAN_MIRROR:-}
  [ -n "$m" ] || m=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  echo "${m:-http://deb.debian.org/debian}"
}

base_recipe() { # base_recipe ROOTFS MIRROR: Debian with Python 3.11 that behaves as python:3.11-slim does
  local r=$1
  # Every path below is under ROOTFS: never let an empty or / argument turn them onto this machine.
  case $r in /*/*) ;; *) die "base_recipe: refusing rootfs '$r'" ;; esac
  # Its phases are shown, not a line per package.
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    "$SUITE" "$r" "$2" 2>&1 |
    { grep --line-buffered -v -E '^I: (Retrieving|Validating) [^ ]+ [^ ]+$|^I: (Extracting|Unpacking|Configuring) [^ ]+\.\.\.$' || true; } >&2
  [ -f "$r/etc/debian_version" ] || die "debootstrap left no Debian in $r"
  # pip may install outside a venv, as in python:3.11-slim.
  rm -f "$r"/usr/lib/python3.*/EXTERNALLY-MANAGED
  # Debian's prefix scheme is posix_local: `pip install --prefix=/install` would put files in
  # /install/local/lib/python3.11/dist-packages, and a Dockerfile that copies /install to /usr/local would find
  # neither its packages nor its scripts. Upstream's layout, and its site dirs on sys.path.
  sed -i "s/prefix_scheme = 'posix_local'/prefix_scheme = 'posix_prefix'/" "$r"/usr/lib/python3.11/sysconfig.py
  printf '%s\n' /usr/local/lib/python3.11/site-packages /usr/lib/python3.11/site-packages \
    >"$r"/usr/lib/python3/dist-packages/00-site-packages.pth
  # Slim as Debian's own container images are: apt keeps no package caches and fetches no translations, dpkg
  # installs no documentation but copyright files, so a Dockerfile's `apt-get install` adds programs only.
  printf '%s\n' \
    'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };' \
    'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };' \
    'Dir::Cache::pkgcache "";' 'Dir::Cache::srcpkgcache "";' >"$r"/etc/apt/apt.conf.d/docker-clean
  printf '%s\n' 'Acquire::Languages "none";' >"$r"/etc/apt/apt.conf.d/docker-no-languages
  printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' 'path-exclude /usr/share/info/*' \
    'path-exclude /usr/share/locale/*' 'path-exclude /usr/share/man/*' >"$r"/etc/dpkg/dpkg.cfg.d/docker
  find "$r"/usr/share/doc ! -type d ! -name copyright -delete
  find "$r"/usr/share/doc -depth -mindepth 1 -type d -empty -delete
  rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb "$r"/var/log/* \
    "$r"/usr/share/info/* "$r"/usr/share/locale/* "$r"/usr/share/man/*
  : >"$r"/etc/resolv.conf  # the build's own, never this machine's
}

build_base() {
  local m stamp want rootfs c mnt t0
  m=$(mirror)
  want=$( { declare -f base_recipe; echo "$SUITE $m"; } | sha256sum | cut -c1-16)
  stamp=$store/base.stamp
  if [ -n "$(image_id "$BASE")" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    log "base $BASE: up to date (recipe $want)"
  else
    t0=$(now_ms)
    rootfs=$store/tmp/rootfs-$SUITE
    rm -rf "$rootfs"
    log "base $BASE: debootstrap $SUITE from $m (about a minute)"
    base_recipe "$rootfs" "$m"
    log "base: rootfs $(du -sh "$rootfs" | cut -f1), committing"
    c=$(B from --network none scratch)
    mnt=$(B mount "$c")
    case $mnt in /*/*) ;; *) die "buildah mount gave '$mnt'" ;; esac
    cp -a "$rootfs/." "$mnt/"
    B umount "$c" >/dev/null
    B config --env LANG=C.UTF-8 --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --cmd '["python3"]' "$c"
    B commit --quiet --rm "$c" "$BASE" >/dev/null
    rm -rf "$rootfs"
    echo "$want" >"$stamp"
    log "base $BASE: built in $(secs $(($(now_ms) - t0))) ($(size_of "$BASE"))"
  fi
  # `FROM python:3.11-slim` with --pull=never resolves to localhost/python:3.11-slim.
  B tag "$BASE" python:3.11-slim
}

# --- the project's images -----------------------------------------------------------------------------------
size_of() { B images --format '{{.Size}}' "$1" 2>/dev/null | head -1; }

check_pins() { # the Dockerfiles that install torch on its own (a layer they share) must pin pyproject.toml's torch
  local want have f
  want=$(grep -o '"torch==[^"]*"' pyproject.toml | sort -u | tr -d '"')
  for f in images/*/Dockerfile; do
    have=$(grep -o 'pip install [^&]*torch==[0-9.]*' "$f" | grep -o 'torch==[0-9.]*' | sort -u || true)
    [ -z "$have" ] || [ "$have" = "$want" ] ||
      die "$f installs $have but pyproject.toml pins $want: change both (the image would hold two torch builds)"
  done
}

stream() { # stream START_MS IDS: pass the build's output through, each step stamped, a note every 30 s of
  # silence; the ID of every image of the build (each step's, cached or new) goes to the file IDS
  local t0=$1 ids=$2 line quiet=0 rc
  : >"$ids"
  while :; do
    if IFS= read -r -t 30 line; then
      quiet=0
      case $line in
        "--> Using cache "*) echo "${line#--> Using cache }" >>"$ids" ;;
        "--> "[0-9a-f]*) echo "${line#--> }" >>"$ids" ;;
      esac
      case $line in
        STEP* | "["*"] STEP "*) printf '[images %(%H:%M:%S)T +%s] %s\n' -1 "$(secs $(($(now_ms) - t0)))" "$line" >&2 ;;
        *) printf '%s\n' "$line" >&2 ;;
      esac
    else
      rc=$?
      ((rc > 128)) || break
      quiet=$((quiet + 30))
      log "  ... still on this step ($quiet s without output, $(secs $(($(now_ms) - t0))) in all)"
    fi
  done
}

build_image() { # build_image NAME
  local n=$1 t0 ref=kiln/$1:$VERSION before after args=()
  [ -f "images/$n/Dockerfile" ] || die "no images/$n/Dockerfile (names: ${ALL[*]})"
  # Build time only: pip trusts this machine's CA bundle and uses its pip.conf; neither is written to a layer.
  [ ! -f "$CA_BUNDLE" ] || args+=(-v "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
  [ ! -f /etc/pip.conf ] || args+=(-v /etc/pip.conf:/etc/pip.conf:ro)
  # The server's CUDA base cannot be pulled: a CPU-only server on the Debian base.
  [ "$n" != server ] || args+=(--build-arg "CUDA_IMAGE=$BASE")
  before=$(image_id "$ref")
  t0=$(now_ms)
  log "kiln/$n: buildah bud -f images/$n/Dockerfile -t $ref"
  mkdir -p "$store/keep"
  B bud --pull=never --network host --layers "${args[@]}" -f "images/$n/Dockerfile" -t "$ref" . 2>&1 |
    stream "$t0" "$store/keep/$n.new"
  mv "$store/keep/$n.new" "$store/keep/$n"
  after=$(image_id "$ref")
  if [ "$before" = "$after" ]; then
    log "kiln/$n: unchanged, $(secs $(($(now_ms) - t0))) ($(size_of "$ref"), ${after:0:12})"
  else
    log "kiln/$n: built in $(secs $(($(now_ms) - t0))) ($(size_of "$ref"), ${after:0:12})"
  fi
}

prune() { # remove the images that no current build uses: unnamed, childless, and no step of the last build of any
  # image ($store/keep/NAME): a replaced image, its replaced steps (and their layers) and a replaced base
  local id kept=0 removed=0
  for id in $(B images --all --no-trunc --filter dangling=true --format '{{.ID}}' 2>/dev/null | sed 's/^sha256://'); do
    if cat "$store"/keep/* 2>/dev/null | grep -q "^${id:0:11}"; then
      kept=$((kept + 1))
    elif B rmi "$id" >/dev/null 2>&1; then
      removed=$((removed + 1))
    fi
  done
  log "prune: removed $removed unused image(s); $kept cached build step(s) kept"
}

sizes() {
  local n
  for n in "${ALL[@]}"; do
    [ -z "$(image_id "kiln/$n:$VERSION")" ] || printf '  %-32s %s\n' "kiln/$n:$VERSION" "$(size_of "kiln/$n:$VERSION")" >&2
  done
  [ -z "$(image_id "$BASE")" ] || printf '  %-32s %s\n' "$BASE" "$(size_of "$BASE")" >&2
  printf '  %-32s %s\n' "builder storage ($store)" "$(du -sh "$store" 2>/dev/null | cut -f1)" >&2
}

# --- into containerd ----------------------------------------------------------------------------------------
# Streamed: buildah writes a docker-archive into a pipe that ctr reads; no tar file is kept. The archive names
# the image kiln/NAME:<version>, which containerd stores as docker.io/kiln/NAME:<version>: the name the CRI
# resolves `image: kiln/NAME:<version>` to (pushed by ID, so that is its only name). An image is imported only
# when containerd lacks it or holds another build under that name (their config digests, the image IDs, differ).
C() { # ctr on $KILN_CONTAINERD_ADDRESS, namespace k8s.io; its notice that cgroup v1 is deprecated is dropped
  "$KILN_CTR" --address "$KILN_CONTAINERD_ADDRESS" --namespace k8s.io "$@" \
    2> >(grep -v 'support for cgroup v1 is deprecated' >&2)
}

manifest_of() { C images ls "name==$1" 2>/dev/null | awk 'NR == 2 {print $3}'; }  # empty when REF is absent

config_of() { # config_of MANIFEST_DIGEST: the image ID
  C content get "$1" 2>/dev/null | grep -o '"config":{[^}]*}' | grep -o 'sha256:[0-9a-f]*' || true
}

load_one() { # load_one BUILT_NAME REF: import the built image as REF (REF's docker.io/ left out in the archive)
  local src=$1 ref=$2 id old_manifest old_id r t0
  id=sha256:$(image_id "$src")
  [ "$id" != sha256: ] || { log "$src: not built (hack/images.sh build)"; return 1; }
  old_manifest=$(manifest_of "$ref")
  old_id=
  [ -z "$old_manifest" ] || old_id=$(config_of "$old_manifest")
  if [ "$old_id" = "$id" ]; then
    log "$ref: already in containerd (${id:7:12})"
    return 0
  fi
  t0=$(now_ms)
  log "$ref: importing ${id:7:12} ($(size_of "$src"))${old_id:+, replacing ${old_id:7:12}}"
  # buildah's own messages go to stderr; the archive alone goes through fd 3 into the pipe.
  B push --quiet "${id#sha256:}" "docker-archive:/dev/fd/3:${ref#docker.io/}" 3>&1 >&2 | C images import - >&2
  r=$(manifest_of "$ref")
  [ -n "$r" ] && [ "$(config_of "$r")" = "$id" ] || die "$ref: containerd does not hold ${id:7:12} after the import"
  # The replaced build stays pinned while a name points to it: the CRI's by-ID name, and the localhost/ name
  # an import by buildah's own name adds. Drop those (nothing else), so containerd collects its layers; running
  # containers keep what they use.
  if [ -n "$old_id" ]; then
    for r in "$old_id" "localhost/${ref#docker.io/}"; do
      [ "$(manifest_of "$r")" != "$old_manifest" ] || C images rm "$r" >/dev/null || log "could not remove $r"
    done
  fi
  log "$ref: imported in $(secs $(($(now_ms) - t0)))"
}

load() {
  local n t0 names=("$@")
  [ -n "${KILN_CONTAINERD_ADDRESS:-}" ] && [ -S "$KILN_CONTAINERD_ADDRESS" ] ||
    die "KILN_CONTAINERD_ADDRESS must name containerd's socket (got '${KILN_CONTAINERD_ADDRESS:-}')"
  [ -n "${KILN_CTR:-}" ] && [ -x "$KILN_CTR" ] || die "KILN_CTR must name a ctr binary (got '${KILN_CTR:-}')"
  ((${#names[@]})) || for n in "${ALL[@]}"; do [ -z "$(image_id "kiln/$n:$VERSION")" ] || names+=("$n"); done
  t0=$(now_ms)
  # The base too: the local storage's helper pods run it.
  load_one "$BASE" "$BASE"
  for n in "${names[@]}"; do
    load_one "kiln/$n:$VERSION" "docker.io/kiln/$n:$VERSION"
  done
  log "load: done in $(secs $(($(now_ms) - t0)))"
}

cmd=${1:-}
shift || true
case $cmd in
  build)
    setup
    names=("$@")
    ((${#names[@]})) || names=("${ALL[@]}")
    check_pins
    t_all=$(now_ms)
    build_base
    for n in "${names[@]}"; do build_image "$n"; done
    prune
    log "build: done in $(secs $(($(now_ms) - t_all)))"
    sizes
    ;;
  load) setup; load "$@" ;;
  sizes) setup; sizes ;;
  *) sed -n '2,/^set -euo/p' "$0" | grep '^#' | cut -c3- >&2; exit 2 ;;
esac
