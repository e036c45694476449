"""Evaluation modes: how one answer's prompt is prefilled, written as a short spec such as ``prefix+sink=4``."""

from __future__ import annotations

from dataclasses import dataclass

from blockrag.engine import BLOCK_MODES, BlockMode, PrefillMode, Recovery
from blockrag.errors import EvaluationError

DEFAULT_MODES = "full,block"
#: Option name in a mode spec -> Recovery field.
RECOVERY_OPTIONS = {"recompute": "recompute", "check": "check_layer", "sink": "sink_tokens"}
MODE_HELP = ("modes are full, block (the index's block mode), naive and prefix; a block mode may be followed by "
             "recovery options +recompute=FRACTION, +check=LAYER, +sink=TOKENS, e.g. prefix+recompute=0.15+check=1")


@dataclass(frozen=True)
class EvalMode:
    """How one mode prefills: ``full``, or block mode with a block mode (None: the engine's) and recovery."""

    name: str
    prefill: PrefillMode
    block_mode: BlockMode | None = None
    recovery: Recovery | None = None


def parse_mode(spec: str) -> EvalMode:
    """``full``, ``block``, ``naive`` or ``prefix``, then ``+option=value`` recovery options for block modes."""
    base, *options = [part.strip() for part in spec.strip().split("+")]
    if base not in ("full", "block", *BLOCK_MODES):
        raise EvaluationError(f"unknown mode {spec!r}: {MODE_HELP}.")
    if base == "full" and options:
        raise EvaluationError(f"{spec!r}: full attention has nothing to recover; recovery options go after a block "
                              "mode, e.g. prefix+recompute=0.15.")
    fields: dict[str, float | int] = {}
    for option in options:
        key, _, value = option.partition("=")
        if key not in RECOVERY_OPTIONS or not value:
            raise EvaluationError(f"{spec!r}: cannot read the option {option!r}: {MODE_HELP}.")
        if RECOVERY_OPTIONS[key] in fields:
            raise EvaluationError(f"{spec!r} gives {key} twice.")
        try:
            number: float | int = float(value) if key == "recompute" else int(value)
        except ValueError:
            kind = "a fraction such as 0.15" if key == "recompute" else "a whole number"
            raise EvaluationError(f"{spec!r}: {key} must be {kind}, got {value!r}.") from None
        fields[RECOVERY_OPTIONS[key]] = number
    name = "+".join([base, *options])
    if base == "full":
        return EvalMode(name, "full")
    try:
        recovery = Recovery(**fields) if fields else None
    except ValueError as exc:
        raise EvaluationError(f"{spec!r}: {exc}.") from None
    return EvalMode(name, "block", None if base == "block" else base, recovery)


def parse_modes(text: str) -> list[EvalMode]:
    """Comma-separated mode specs, each at most once; the first is what the others are compared against."""
    modes = [parse_mode(spec) for spec in text.split(",") if spec.strip()]
    if not modes:
        raise EvaluationError(f"no modes given: {MODE_HELP}.")
    names = [m.name for m in modes]
    if len(set(names)) != len(names):
        raise EvaluationError(f"a mode is listed twice in {text!r}; list each once.")
    return modes
