"""Emulation of a 2-tier cluster on one machine: hosts as network namespaces joined by
tbf-shaped links (``netns``), per-collective alpha-beta delays (``delay``), and the launcher
that starts each rank inside its host's namespace (``launch``). Nothing here is needed on a
real cluster; benchmarks and tests use it to make the host hierarchy measurable."""
