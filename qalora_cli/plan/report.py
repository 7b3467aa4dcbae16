"""The plan as a user reads it: per device, the peak and what makes it up, then one line."""

from __future__ import annotations

from .budget import StagePlan


def human(n: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / (1 << 10):.1f} KiB"


def render(plan: StagePlan) -> str:
    lines = [f"memory plan for qalora {plan.stage} (dry run: no weights read, nothing written)",
             f"model:    {plan.model}", f"settings: {plan.settings}"]
    lines += [f"note:     {n}" for n in plan.notes]
    width = max(len(c.name) for p in plan.phases for c in p.components)
    for dev in plan.devices():
        phase = plan.peak_phase(dev)
        lines += ["", f"{dev}: peak {human(phase.total(dev))} during {phase.name}"]
        lines += [f"  {c.name:<{width}}  {human(c.bytes):>11}" for c in phase.components if c.device == dev]
    lines += ["", f"{plan.stage} needs " + ", ".join(f"{human(plan.peak(d))} of {_label(d)}" for d in plan.devices())]
    return "\n".join(lines)


def _label(device: str) -> str:
    return "CPU RAM" if device == "cpu" else f"{device.upper()} GPU memory"
