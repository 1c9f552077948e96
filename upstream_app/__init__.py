"""Plain restaurant JSON API (the upstream behind the sidecar), its migrations and seeds."""
