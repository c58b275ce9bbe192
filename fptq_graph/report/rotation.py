"""The report's rotation section as text lines (`fptq-graph inspect`, the quantize log): how the residual
stream was rotated, or why it was not, and what each group of linears reading one norm multiplies before
and after (the max |x| and the max/median ratio of the per-channel maxima: how far outlier channels stand
out; passes/rewrite/rotate_residual.py measures both on one calibration sample)."""
from __future__ import annotations


def rotation_lines(rotation: dict) -> list[str]:
    if not rotation or rotation.get("method", "none") == "none":
        return []
    if not rotation.get("rotated"):
        return [f"  rotation ({rotation['method']}): not rotated: {rotation.get('reason', 'unknown')}"]
    checked = rotation.get("checked") or {}
    lines = [f"  rotation: {rotation['kind']} of order {rotation['hidden']} ({rotation['construction']}, seed "
             f"{rotation['seed']}); {rotation['readers']} reading linears, {rotation['writers']} writing, "
             f"{rotation['tables']} table(s), {rotation['norms']} norm gains folded"
             + (f"; float check on one calibration sample: max relative error {checked['max_relative_error']:.1e} "
                f"(tolerance {checked['tolerance']:g}) over {checked.get('scope', 'the whole model')}" if checked else "")]
    groups: dict[tuple, list[str]] = {}
    for name, value in (rotation.get("ranges") or {}).items():
        key = tuple(sorted((side, tuple(sorted(value[side].items()))) for side in ("before", "after")))
        groups.setdefault(key, []).append(name)
    for key, names in groups.items():
        sides = {side: dict(items) for side, items in key}
        before, after = sides["before"], sides["after"]
        lines.append(f"    {', '.join(names)}: input max {before['max']:.3g} -> {after['max']:.3g}, "
                     f"max/median {_ratio(before)} -> {_ratio(after)}")
    return lines


def _ratio(side: dict) -> str:
    value = side.get("max_over_median")
    return "-" if value is None else f"{value:.3g}"
