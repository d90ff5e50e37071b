"""Stage 5, measurement: `bench` (stock offload against the expert cache at a VRAM budget, each
configuration in its own process), `profile` (a MoE layer's parts, expert loads, bus bandwidth), the
emulated edge devices they can run under, and the machine facts every report records. The last
stage: it may import every other one, and none imports it."""
