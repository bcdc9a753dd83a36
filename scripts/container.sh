#!/usr/bin/env bash
# The container engine: Docker where its engine runs, else daemonless buildah and podman,
# which share one local image store.
#   scripts/container.sh build-image gpu|cpu   build the Bento and its image NAME:VERSION + NAME:latest
#   scripts/container.sh compose ARGS...       docker compose ARGS, or podman-compose ARGS
#   scripts/container.sh ARGS...               docker ARGS, or podman ARGS
set -euo pipefail
cd "$(dirname "$0")/.."
bentoml=$PWD/.venv/bin/bentoml  # the pinned BentoML that `make` installs

if docker info >/dev/null 2>&1; then
  engine=(docker)
  builder=()
else
  # runc, cgroupfs and a log file work without systemd or journald, as on CI machines.
  engine=(podman --runtime runc --cgroup-manager cgroupfs --events-backend file)
  # chroot isolation builds inside containers too; layers caches the steps above the code.
  builder=(--backend buildah --opt isolation=chroot --opt layers)
fi

if [[ ${1-} == build-image ]]; then
  case ${2-} in
    gpu) bentofile=bentofile.yaml ;;
    cpu) bentofile=bentofile.cpu.yaml ;;
    *) echo "usage: $0 build-image gpu|cpu" >&2; exit 2 ;;
  esac
  tag=$("$bentoml" build -f "$bentofile" -o tag)
  tag=${tag#__tag__:}
  # From /: BentoML 1.4.40 renders Dockerfile.template again from a copy of the Bento in a
  # temporary folder, and refuses to read a template outside the working directory
  # (bentoml/BentoML#5566).
  cd /
  exec "$bentoml" containerize "$tag" "${builder[@]}" -t "$tag" -t "${tag%%:*}:latest"
fi

if [[ ${1-} == compose ]]; then
  if [[ ${engine[0]} == docker ]]; then exec docker "$@"; fi
  # podman-compose (requirements-dev.txt) passes these options on to each podman command.
  exec "$PWD/.venv/bin/podman-compose" --podman-args "${engine[*]:1}" "${@:2}"
fi

if [[ ${1-} == run && ${engine[0]} == podman ]]; then
  # As root, podman raises the open-file and process limits past what a host without
  # CAP_SYS_RESOURCE lets it set, and the container fails to start: ask for what a server needs.
  set -- run --ulimit nofile=16384:16384 --ulimit nproc=8192:8192 "${@:2}"
fi
exec "${engine[@]}" "$@"
