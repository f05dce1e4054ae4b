#!/bin/sh
# Runs `opt-queue worker` (the default) or Flower (`flower`) against OPT_QUEUE_BROKER_URL.
# Keys come from OPT_QUEUE_API_KEYS or the config at OPT_QUEUE_CONFIG; nothing secret is logged.
set -eu
case "${1:-worker}" in
  worker)
    shift || true
    exec opt-queue worker "$@"
    ;;
  flower)
    shift
    exec celery -A opt_queue.app flower --port="${FLOWER_PORT:-5555}" --persistent=True \
      --db=/data/flower.db --state_save_interval=60000 "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
