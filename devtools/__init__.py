"""Development tooling: the tiny model, the stand-in hub and helpers for tests and
benchmarks. Never shipped in the Bento; importing it changes nothing."""
