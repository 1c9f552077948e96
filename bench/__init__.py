"""The benchmark harness (``python -m bench``, ``make bench``): the sidecar against direct
and nginx under wrk. Modules: ``upstream`` (the trivial app), ``processes`` (pinned,
always-cleaned-up children), ``targets`` (upstream, nginx, sidecars, redis-server),
``wrk`` (load generator runs), ``procstat`` (CPU and RSS from /proc), ``scenarios``
(interleaved rounds), ``summary`` (medians, ratios, goals), ``report`` (tables, JSON),
``profile`` (py-spy flamegraphs)."""
