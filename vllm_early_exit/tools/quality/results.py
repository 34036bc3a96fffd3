"""What a quality run has measured (:class:`Results`), in method order, and merging an earlier report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from vllm_early_exit.tools.quality.methods import METHODS
from vllm_early_exit.tools.quality.scores import OPERATING_TARGET, Point, frontier, pick_operating_point


@dataclass
class Results:
    """What a run has measured so far; ``report()`` turns it into the JSON document."""

    setup: dict
    points: list[Point] = field(default_factory=list)
    operating: dict[str, dict] = field(default_factory=dict)
    humaneval: dict[str, dict] = field(default_factory=dict)
    engine_settings: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    skip: dict = field(default_factory=dict)

    def choose_operating_point(self, method: str) -> Point | None:
        """Records (and returns) the method's operating point, or why it has none."""
        point = pick_operating_point([p for p in self.points if p.signal == method])
        if point is None:
            self.operating[method] = {
                "setting": None, "note": f"no point below full depth reaches token agreement {OPERATING_TARGET}",
            }
        else:
            self.operating[method] = {"setting": point.setting, "depth": point.depth, "token_agreement": point.token_agreement}
        return point

    def report(self) -> dict:
        points = sorted(self.points, key=lambda p: METHOD_ORDER[p.signal])  # stable: sweep order within a method
        return {
            "setup": self.setup | {"engine_settings": in_method_order(self.engine_settings), "skip": self.skip},
            "points": [p.to_dict() for p in points],
            "frontier": frontier(points),
            "operating_points": in_method_order(self.operating),
            "humaneval": in_method_order(self.humaneval),
            "skipped": in_method_order(self.skipped),
        }


METHOD_ORDER = {m: i for i, m in enumerate(("full",) + METHODS)}


def in_method_order(table: dict) -> dict:
    """A per-method table with its methods in the order of ``METHODS`` (full depth first)."""
    return dict(sorted(table.items(), key=lambda item: METHOD_ORDER[item[0]]))


MERGE_KEYS = ("model", "num_layers", "prompts", "prompt_split", "max_tokens", "dtype")


def merge_previous(results: Results, previous: dict, methods: Sequence[str]) -> None:
    """Takes over the results of the methods this run does not measure from an earlier report
    of the same setup (e.g. to add ``head,gate`` once heads are trained)."""
    old = previous["setup"]
    differ = {k: (old.get(k), results.setup[k]) for k in MERGE_KEYS if old.get(k) != results.setup[k]}
    if old.get("humaneval", {}).get("problems") != results.setup["humaneval"]["problems"]:
        differ["humaneval"] = (old.get("humaneval"), results.setup["humaneval"])
    if differ:
        raise SystemExit(f"--merge: the earlier report was measured with other settings (earlier, now): {differ}")
    names = {f.name for f in fields(Point)}
    keep = lambda method: method not in methods and method != "full"  # noqa: E731
    results.points += [Point(**{k: v for k, v in p.items() if k in names}) for p in previous["points"] if keep(p["signal"])]
    results.operating |= {m: v for m, v in previous["operating_points"].items() if keep(m)}
    results.humaneval |= {m: v for m, v in previous["humaneval"].items() if keep(m)}
    results.skipped |= {m: v for m, v in previous["skipped"].items() if keep(m)}
    results.engine_settings |= {m: v for m, v in old.get("engine_settings", {}).items() if keep(m)}
    if "skip" not in methods:
        results.skip = old.get("skip", {})
    results.setup["thresholds"] = {m: v for m, v in old.get("thresholds", {}).items() if keep(m)} | results.setup["thresholds"]
    results.setup["methods"] = [m for m in METHODS if m in methods or m in old.get("methods", [])]
    results.setup["merged"] = {
        "date": old.get("date"), "seconds": old.get("seconds"), "methods": [m for m in old.get("methods", []) if keep(m)],
    }
