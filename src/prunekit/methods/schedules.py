"""Schedules: when to prune and how much.

Schedules count **optimizer steps** (calls of :meth:`prunekit.Pruner.step`), not epochs; use
:func:`epochs_to_steps` to convert. A schedule names its *pruning events* (the steps at which the
pruner prunes) and the sparsity to reach at each, as a function of the final sparsity ``s_f``.

- :class:`OneShot` — everything at one step.
- :class:`Iterative` — ``rounds`` prune-and-fine-tune rounds from ``start`` to ``end``; every round
  removes the same fraction of the weights still alive, so after round r of R the sparsity is
  1 − (1 − s_f)^(r/R) (Han et al. 2015; Frankle & Carbin 2019 prune 20% of the remaining weights a round).
- :class:`Gradual` — prune every ``every`` steps from ``start`` to ``end`` following a curve; the
  default is the cubic of Zhu & Gupta 2017, "To prune, or not to prune":
  s_t = s_f + (s_i − s_f)(1 − (t − t0)/(nΔt))³ for t0 ≤ t ≤ t0 + nΔt.
"""

from __future__ import annotations

import math


def _check_step(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be a whole number of optimizer steps, got {value!r} (see pk.epochs_to_steps)")
    if value < 0:
        raise ValueError(f"{what} must be ≥ 0 (a step count), got {value}")
    return value


def _check_span(start: object, end: object) -> tuple[int, int]:
    start, end = _check_step(start, "start"), _check_step(end, "end")
    if end < start:
        raise ValueError(f"the schedule ends (end={end}) before it starts (start={start}); make end ≥ start")
    return start, end


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """Convert a number of epochs (may be fractional) into optimizer steps, rounded to the nearest step."""
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be a positive whole number of optimizer steps, got {steps_per_epoch!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not math.isfinite(epochs) or epochs < 0:
        raise ValueError(f"epochs must be a finite number ≥ 0 (may be fractional, e.g. 2.5), got {epochs!r}")
    return int(round(epochs * steps_per_epoch))


class Schedule:
    """Base class. Subclasses define :meth:`next_event` and :meth:`sparsity_at`."""

    def next_event(self, after: int) -> int | None:
        """The first pruning step strictly after ``after`` (use −1 for the first), or None when done."""
        raise NotImplementedError

    def sparsity_at(self, step: int, final: float, initial: float = 0.0) -> float:
        """Sparsity (fraction of units) the schedule asks for once ``step`` steps are done."""
        raise NotImplementedError

    @property
    def initial(self) -> float:
        return 0.0

    @property
    def last_event(self) -> int:
        raise NotImplementedError

    def events(self) -> list[int]:
        """All pruning steps in order."""
        found, step = [], self.next_event(-1)
        while step is not None:
            found.append(step)
            step = self.next_event(step)
        return found


class OneShot(Schedule):
    """Prune once, to the final sparsity, when ``at`` steps are done (``at=0``: before training)."""

    def __init__(self, at: int = 0):
        self.at = _check_step(at, "at")

    def next_event(self, after):
        return self.at if after < self.at else None

    def sparsity_at(self, step, final, initial=0.0):
        return final if step >= self.at else 0.0

    @property
    def last_event(self):
        return self.at

    def __repr__(self):
        return f"OneShot(at={self.at})"


class Iterative(Schedule):
    """``rounds`` pruning rounds evenly spaced from step ``start`` to step ``end`` (both included).

    Every round prunes the same fraction of the remaining units: after round r of R the sparsity is
    1 − (1 − s_f)^(r/R). Fine-tune between rounds; add :meth:`prunekit.Pruner.rewind_to` for lottery
    tickets.
    """

    def __init__(self, start: int, end: int, rounds: int):
        self.start, self.end = _check_span(start, end)
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
        if rounds > 1 and end - start < rounds - 1:
            raise ValueError(
                f"{rounds} rounds need at least {rounds - 1} steps between start and end, got {end - start}"
            )
        self.rounds = rounds
        self._steps = (
            [start] if rounds == 1 else [start + round(i * (end - start) / (rounds - 1)) for i in range(rounds)]
        )

    @classmethod
    def per_round(cls, fraction: float, rounds: int, start: int, every: int) -> tuple[Iterative, float]:
        """Frankle & Carbin's form: prune ``fraction`` of the remaining units every ``every`` steps.

        Returns the schedule and the final sparsity 1 − (1 − fraction)^rounds to pass to the pruner.
        """
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1) (of the remaining units, 0.2 = 20%), got {fraction!r}")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be a positive whole number of pruning rounds, got {rounds!r}")
        _check_step(start, "start")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive number of optimizer steps between rounds, got {every!r}")
        schedule = cls(start, start + every * (rounds - 1), rounds)
        return schedule, 1.0 - (1.0 - fraction) ** rounds

    def next_event(self, after):
        return next((s for s in self._steps if s > after), None)

    def sparsity_at(self, step, final, initial=0.0):
        done = sum(1 for s in self._steps if s <= step)
        return 1.0 - (1.0 - final) ** (done / self.rounds)

    @property
    def last_event(self):
        return self._steps[-1]

    def __repr__(self):
        return f"Iterative(start={self.start}, end={self.end}, rounds={self.rounds})"


_CURVES = ("cubic", "linear", "cosine")


class Gradual(Schedule):
    """Prune every ``every`` steps from ``start`` to ``end``, sparsity rising from ``initial`` to the final.

    With progress p = (t − start)/(end − start) in [0, 1]:

    - ``"cubic"`` (Zhu & Gupta 2017): s_t = s_f + (s_i − s_f)(1 − p)³ — fast early, gentle at the end;
    - ``"linear"``: s_t = s_i + (s_f − s_i)·p;
    - ``"cosine"``: s_t = s_f + (s_i − s_f)·(1 + cos(π·p))/2.

    ``initial`` is a fraction in [0, 1) reached at ``start``. Pruning events fall on start,
    start + every, … and always on ``end``.
    """

    def __init__(self, start: int, end: int, every: int = 100, initial: float = 0.0, curve: str = "cubic"):
        self.start, self.end = _check_span(start, end)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every!r}")
        if isinstance(initial, bool) or not isinstance(initial, (int, float)) or not 0.0 <= initial < 1.0:
            raise ValueError(f"initial must be a sparsity fraction in [0, 1), got {initial!r}")
        if curve not in _CURVES:
            raise ValueError(f"unknown curve {curve!r}; valid curves are {', '.join(map(repr, _CURVES))}")
        self.every, self._initial, self.curve = every, float(initial), curve

    @property
    def initial(self):
        return self._initial

    def next_event(self, after):
        if after >= self.end:
            return None
        if after < self.start:
            return self.start
        step = self.start + ((after - self.start) // self.every + 1) * self.every
        return min(step, self.end)

    def sparsity_at(self, step, final, initial=None):
        initial = self._initial if initial is None else initial
        if step < self.start:
            return 0.0
        if step >= self.end:
            return final
        progress = (step - self.start) / (self.end - self.start)
        if self.curve == "cubic":
            return final + (initial - final) * (1.0 - progress) ** 3
        if self.curve == "linear":
            return initial + (final - initial) * progress
        return final + (initial - final) * (1.0 + math.cos(math.pi * progress)) / 2.0

    @property
    def last_event(self):
        return self.end

    def __repr__(self):
        return f"Gradual(start={self.start}, end={self.end}, every={self.every}, initial={self._initial}, curve={self.curve!r})"


#: Schedules by the name their configuration uses, with the constructor arguments that describe them.
SCHEDULES: dict[str, tuple[type[Schedule], tuple[str, ...]]] = {
    "one_shot": (OneShot, ("at",)),
    "iterative": (Iterative, ("start", "end", "rounds")),
    "gradual": (Gradual, ("start", "end", "every", "initial", "curve")),
}


def schedule_to_dict(schedule: Schedule) -> dict:
    """``{name: {argument: value}}`` describing a built-in schedule (e.g. ``{"gradual": {"start": 0, ...}}``);
    a schedule of another class is described by its ``repr`` under ``"custom"``."""
    for name, (cls, fields) in SCHEDULES.items():
        if type(schedule) is cls:
            return {name: {field: getattr(schedule, field) for field in fields}}
    return {"custom": repr(schedule)}


def schedule_from_dict(spec: dict) -> Schedule:
    """Inverse of :func:`schedule_to_dict` for the built-in schedules."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f"a schedule is described by one entry {{name: {{arguments}}}}, got {spec!r}")
    ((name, arguments),) = spec.items()
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid ones are {', '.join(map(repr, SCHEDULES))}")
    cls, fields = SCHEDULES[name]
    unknown = set(arguments or {}) - set(fields)
    if unknown:
        raise ValueError(f"schedule {name!r} takes {list(fields)}, not {sorted(unknown)}")
    return cls(**(arguments or {}))
