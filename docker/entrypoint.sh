#!/bin/sh
# web | worker | beat | migrate | any other command
set -e
# Upstream-call metrics of every process of every container, summed by /metrics: each container
# writes into its own subdirectory of the shared volume (pids repeat across containers).
if [ -n "${LEASESITE_METRICS_DIR:-}" ] && [ -z "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
  export PROMETHEUS_MULTIPROC_DIR="$LEASESITE_METRICS_DIR/$(hostname)"
  mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
fi
case "$1" in
  web)
    exec gunicorn leasesite.wsgi:application --bind 0.0.0.0:8000 \
      --workers "${WEB_CONCURRENCY:-3}" --access-logfile - --timeout 60
    ;;
  worker)
    # CELERY_WORKER_QUEUES (comma-separated) makes a dedicated worker, e.g. one for
    # CELERY_REFRESH_QUEUE; unset, the worker consumes every queue (docs/SCALING.md).
    exec celery -A leasesite worker --loglevel="${LOG_LEVEL:-INFO}" \
      --concurrency "${CELERY_CONCURRENCY:-2}" ${CELERY_WORKER_QUEUES:+-Q "$CELERY_WORKER_QUEUES"}
    ;;
  beat)
    # Exactly one beat per deployment; schedules live in the database (django-celery-beat).
    exec celery -A leasesite beat --loglevel="${LOG_LEVEL:-INFO}" \
      --scheduler django_celery_beat.schedulers:DatabaseScheduler
    ;;
  migrate)
    # Runs before web and workers start: the counts of the previous deployment's processes go.
    if [ -n "${LEASESITE_METRICS_DIR:-}" ]; then
      find "$LEASESITE_METRICS_DIR" -mindepth 1 -delete
    fi
    python manage.py migrate --noinput
    exec python manage.py setup_schedules
    ;;
  *)
    exec "$@"
    ;;
esac
