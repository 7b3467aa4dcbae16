"""What a plan is made of: components (a name, a device, bytes) held together in a phase of a
stage, and the stage's peak per device, which is its largest phase on that device."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Component:
    name: str
    device: str      # "cpu" or a GPU name such as "cuda"
    bytes: int
    fixed: bool = False  # a measured constant of the runtime, not tensors (no allocator margin on it)


@dataclass
class Phase:
    """Everything alive at the same moment of a stage (e.g. "block loop", "verification")."""
    name: str
    components: list[Component] = field(default_factory=list)

    def add(self, name: str, device: str, nbytes: float, fixed: bool = False) -> "Phase":
        if nbytes > 0:
            self.components.append(Component(name, device, int(nbytes), fixed))
        return self

    def total(self, device: str) -> int:
        return sum(c.bytes for c in self.components if c.device == device)

    def devices(self) -> list[str]:
        return sorted({c.device for c in self.components}, key=lambda d: (d != "cpu", d))


@dataclass
class StagePlan:
    stage: str
    model: str                        # what the shape was read from
    settings: str                     # the settings that size it, in a few words
    phases: list[Phase]
    notes: list[str] = field(default_factory=list)

    def devices(self) -> list[str]:
        return sorted({d for p in self.phases for d in p.devices()}, key=lambda d: (d != "cpu", d))

    def peak_phase(self, device: str) -> Phase:
        return max(self.phases, key=lambda p: p.total(device))

    def peak(self, device: str) -> int:
        return self.peak_phase(device).total(device)

    def as_dict(self) -> dict:
        return {"stage": self.stage, "model": self.model, "settings": self.settings, "notes": self.notes,
                "peak_bytes": {d: self.peak(d) for d in self.devices()},
                "peak_phase": {d: self.peak_phase(d).name for d in self.devices()},
                "phases": [{"name": p.name, "components": [c.__dict__ for c in p.components],
                            "total_bytes": {d: p.total(d) for d in p.devices()}} for p in self.phases]}
