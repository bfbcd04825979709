"""Observability: what each collective sends over which link class (``comm``). Opt-in:
only measured runs install the counting hooks, so plain training keeps DDP's C++ reducer."""
