"""Methods: the choices along prunekit's axes — criteria (how weights are scored), granularities (which
weights go together), schedules (when, and how much) and constraints (limits every mask must meet).
Each is a small class, registered by name where it has one; none of them touches a model's masks."""
