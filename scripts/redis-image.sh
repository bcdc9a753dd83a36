#!/usr/bin/env bash
# A Redis image from Debian's redis-server package on the local python:3.11-slim
# (scripts/base-image.sh), for machines that cannot pull redis:7.4 from Docker Hub (like CI).
# deploy/docker-compose.yaml runs it in place of redis:7.4 when REDIS_IMAGE names it.
# Idempotent: does nothing if the image exists. Needs root and buildah.
set -euo pipefail

IMAGE=${REDIS_IMAGE:-localhost/sdxl-controlnet-redis:bookworm}

if buildah inspect --type image "$IMAGE" >/dev/null 2>&1; then
  echo "Redis image $IMAGE already exists"; exit 0
fi
ctr=$(buildah from python:3.11-slim)
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
root=$(buildah mount "$ctr")
# The base image's apt sources are the host's mirrors.
chroot "$root" apt-get update -qq
chroot "$root" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends redis-server >/dev/null
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/*
# As in the official image: the data in /data, the server run as the user the package made.
mkdir "$root/data"
chroot "$root" chown redis:redis /data
buildah umount "$ctr" >/dev/null
buildah config --user redis --workingdir /data --port 6379 --cmd redis-server "$ctr"
buildah commit --rm --quiet "$ctr" "$IMAGE" >/dev/null
trap - EXIT
echo "built $IMAGE"
