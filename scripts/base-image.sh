#!/usr/bin/env bash
# Build python:3.11-slim locally, for machines that reach Debian mirrors and PyPI but not
# Docker Hub (like CI): the Dockerfile that `bentoml containerize` generates starts FROM it,
# and buildah uses a local image of that name instead of pulling one.
# Idempotent: does nothing if the image exists. Needs root, debootstrap and buildah.
set -euo pipefail

IMAGE=${IMAGE:-python:3.11-slim}
SUITE=${SUITE:-bookworm}

if buildah inspect --type image "$IMAGE" >/dev/null 2>&1; then
  echo "base image $IMAGE already exists"; exit 0
fi

# The mirrors are the host's own: apt reads its sources (/etc/apt/sources.list, and the deb822
# `URIs:` of /etc/apt/sources.list.d/*.sources) and lists the repository of each suite, so the
# image fetches from where the host is allowed to. MIRROR and SECURITY_MIRROR override them.
mirror_of() {
  apt-get indextargets --format '$(RELEASE) $(REPO_URI)' 2>/dev/null |
    awk -v suite="$1" '$1 == suite { print $2; exit }'
}
MIRROR=${MIRROR:-$(mirror_of "$SUITE")}
SECURITY_MIRROR=${SECURITY_MIRROR-$(mirror_of "$SUITE-security")}
if [[ -z $MIRROR ]]; then
  echo "no apt source of this host serves $SUITE: set MIRROR to a Debian mirror" >&2; exit 1
fi

ctr=$(buildah from scratch)
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
root=$(buildah mount "$ctr")

# A minimal Debian with bookworm's Python 3.11: the Dockerfile's `uv venv --python 3.11`
# finds it instead of downloading one.
debootstrap --variant=minbase \
  --include=python3,python3-pip,python3-venv,ca-certificates \
  "$SUITE" "$root" "$MIRROR"

# Slim like Docker's Debian images: no documentation, manual pages or translations, neither
# now nor from packages installed later (copyright files stay).
cat > "$root/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
find "$root/usr/share/doc" -type f ! -name copyright -delete
rm -rf "$root"/usr/share/{man,info,locale,lintian}/*

# Trust the host's extra CAs inside the image, for networks that inspect TLS:
# without them pip and uv fail with certificate errors during the build.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates
fi

{
  printf 'deb %s %s main\ndeb %s %s-updates main\n' "$MIRROR" "$SUITE" "$MIRROR" "$SUITE"
  if [[ -n $SECURITY_MIRROR ]]; then printf 'deb %s %s-security main\n' "$SECURITY_MIRROR" "$SUITE"; fi
} > "$root/etc/apt/sources.list"
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin

buildah umount "$ctr" >/dev/null
CA=/etc/ssl/certs/ca-certificates.crt
# PIP_BREAK_SYSTEM_PACKAGES: PEP 668 would refuse the Dockerfile's `pip install uv`.
# The CA variables make pip, requests and uv use the system trust store above.
buildah config \
  --env LANG=C.UTF-8 \
  --env PIP_BREAK_SYSTEM_PACKAGES=1 \
  --env SSL_CERT_FILE=$CA --env REQUESTS_CA_BUNDLE=$CA --env PIP_CERT=$CA --env UV_SYSTEM_CERTS=1 \
  --cmd '["python3"]' "$ctr"
buildah commit --rm "$ctr" "$IMAGE"
trap - EXIT
