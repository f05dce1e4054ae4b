#!/bin/sh
# Runs `opt-queue worker` (the default), Flower (`flower`), another opt-queue command (`submit
# data.jsonl`, `collect`, `status`, ...) or any command, against OPT_QUEUE_BROKER_URL.
# Keys come from OPT_QUEUE_API_KEYS or the config at OPT_QUEUE_CONFIG; nothing secret is logged.
set -eu
case "${1:-worker}" in
  worker)
    if [ $# -gt 0 ]; then shift; fi
    exec opt-queue worker "$@"
    ;;
  flower)
    shift
    exec celery -A opt_queue.queue.app flower --port="${FLOWER_PORT:-5555}" --persistent=True \
      --db=/data/flower.db --state_save_interval=60000 "$@"
    ;;
  submit|collect|status|run|reset|merge|demo|sim)
    exec opt-queue "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
