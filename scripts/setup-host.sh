#!/usr/bin/env bash
# Installs what Walkabout needs on a Debian host, idempotently:
#   - QEMU >= 10 (qemu-system-x86 + qemu-utils), from the codename's backports suite when
#     the main suite only has an older QEMU. The backports source is derived from the
#     machine's own Debian source entry (same mirror), never from a hard-coded host.
#   - iproute2 (network namespaces for multi-host tests) and nftables (the NAT router
#     between two sites of tests/between_clouds.rs).
#   - e2fsprogs (`mke2fs -d` builds the guest's ext4 root disk without root privileges).
#   - Chromium and its WebDriver (Debian's chromium + chromium-driver, from the machine's
#     own sources): the web console's tests drive a headless browser.
#   - etcd-server (3.4, the store shared by several controllers: `--store etcd://...`,
#     `walkabout up --ha`, tests/ha.rs) and protoc with its well-known types
#     (protobuf-compiler, libprotobuf-dev: the etcd client crate compiles etcd's .proto
#     files), from the machine's own Debian suite.
# Kernel and busybox for the guest image are *not* installed here: `walkabout image build`
# downloads and unpacks them into its cache without installing them on the host.
set -euo pipefail

need_major=10
log() { echo "setup-host: $*" >&2; }

qemu_major() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 || { echo 0; return; }
  qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -n1
}

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

have_mke2fs() { command -v mke2fs >/dev/null 2>&1 || [ -x /usr/sbin/mke2fs ] || [ -x /sbin/mke2fs ]; }
have_browser() { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }
have_nft() { command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ]; }
have_protoc() { command -v protoc >/dev/null 2>&1 && [ -f /usr/include/google/protobuf/descriptor.proto ]; }

# The tools from the machine's own main suite (no backports needed), each only if missing.
# The etcd package enables a system etcd on 2379; Walkabout starts its own on free ports.
install_tools() {
  local missing=()
  command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  have_nft || missing+=(nftables)
  have_mke2fs || missing+=(e2fsprogs)
  have_browser || missing+=(chromium chromium-driver)
  command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
  have_protoc || missing+=(protobuf-compiler libprotobuf-dev)
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive sudo_ apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
  command -v ip >/dev/null 2>&1 && have_nft && have_mke2fs && have_browser && command -v etcd >/dev/null 2>&1 && have_protoc ||
    { log "still missing after installing ${missing[*]}"; exit 1; }
}

if [ "$(qemu_major)" -ge "$need_major" ] && command -v qemu-img >/dev/null; then
  install_tools
  exit 0
fi

[ -r /etc/os-release ] && . /etc/os-release
codename=${VERSION_CODENAME:-}
[ -n "$codename" ] || { log "cannot tell the Debian codename from /etc/os-release"; exit 1; }

# Derive the backports source from the machine's own main Debian entry.
bpo=/etc/apt/sources.list.d/walkabout-backports.sources
if ! grep -rqs "${codename}-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  uri=""
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    # deb822: take the URIs of a stanza whose Suites include the bare codename.
    uri=$(awk -v c="$codename" '
      /^URIs:/ {u=$2} /^Suites:/ {for(i=2;i<=NF;i++) if($i==c) hit=1}
      /^$/ {if(hit && u!="") {print u; exit} hit=0; u=""}
      END {if(hit && u!="") print u}' "$f" | head -n1)
    [ -n "$uri" ] && break
  done
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk -v c="$codename" '$1=="deb" && $3==c {print $2; exit}' /etc/apt/sources.list)
  fi
  [ -n "$uri" ] || { log "no Debian source entry for '$codename' to derive backports from"; exit 1; }
  log "adding ${codename}-backports from the machine's own mirror entry"
  printf 'Types: deb\nURIs: %s\nSuites: %s-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$uri" "$codename" | sudo_ tee "$bpo" >/dev/null
fi

log "installing QEMU >= $need_major"
sudo_ apt-get update -qq
DEBIAN_FRONTEND=noninteractive sudo_ apt-get install -y -qq --no-install-recommends \
  -t "${codename}-backports" qemu-system-x86 qemu-utils >/dev/null
v=$(qemu_major)
[ "$v" -ge "$need_major" ] || { log "installed QEMU is $v.x; Walkabout needs >= $need_major"; exit 1; }
log "QEMU $(qemu-system-x86_64 --version | head -n1)"
install_tools
