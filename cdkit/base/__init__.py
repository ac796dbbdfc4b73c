"""The base every layer stands on: errors, atomic writes and locks (io), paths, parameters, progress, timing, metrics."""
