"""What an import did or would do: rows per table, datapoint counters, problems and conflicts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: The datapoint counters (`import_runs.rows_*`, `webmacs._core.WebmacsTransfer.run`) with what each means.
DATAPOINT_COUNTERS = {
    "read": "source rows read",
    "inserted": "written",
    "duplicate": "already present (kept out by the unique key)",
    "shifted": "written 1 µs after an earlier row of their event at the same time (collision rule)",
    "out_of_range": "written, outside their event's min_value..max_value",
    "unknown_experiment": "written untagged: their experiment does not exist",
    "unknown_event": "skipped: no event, or an event that does not exist",
    "invalid_value": "skipped: value NULL, NaN or infinite",
    "bad_time": "skipped: time before 1970 or more than 5 minutes ahead",
    "no_timestamp": "skipped: no timestamp (never streamed)",
}


@dataclass
class Problem:
    """Something about the source worth knowing; `blocking` ones stop the import."""

    kind: str
    table: str
    count: int
    detail: str
    examples: list[str] = field(default_factory=list)
    blocking: bool = False

    def line(self) -> str:
        head = f"{'ERROR' if self.blocking else 'note'}: {self.table}: {self.count:,} {self.detail}"
        if self.examples:
            head += " (e.g. " + "; ".join(self.examples[:5]) + ")"
        return head


@dataclass
class TableCount:
    """Rows of one table: in the source, imported, merged into existing rows, left out as invalid."""

    source: int = 0
    imported: int = 0
    merged: int = 0
    invalid: int = 0


@dataclass
class Report:
    tables: dict[str, TableCount] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    datapoints: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def table(self, name: str) -> TableCount:
        return self.tables.setdefault(name, TableCount())

    def problem(
        self,
        kind: str,
        table: str,
        count: int,
        detail: str,
        examples: list[str] | None = None,
        *,
        blocking: bool = False,
    ) -> None:
        if count:
            self.problems.append(Problem(kind, table, count, detail, examples or [], blocking))

    @property
    def blocked(self) -> bool:
        return any(p.blocking for p in self.problems)

    def to_json(self) -> dict[str, Any]:
        # Tables as a list: their order survives a jsonb column (an object's keys would not).
        return {
            "tables": [{"table": k, **asdict(v)} for k, v in self.tables.items()],
            "problems": [asdict(p) for p in self.problems],
            "datapoints": self.datapoints,
            "notes": self.notes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        return cls(
            tables={t["table"]: TableCount(**{k: v for k, v in t.items() if k != "table"}) for t in data["tables"]},
            problems=[Problem(**p) for p in data.get("problems", [])],
            datapoints=dict(data.get("datapoints", {})),
            notes=list(data.get("notes", [])),
        )

    def render(self) -> str:
        lines = [f"{'table':<20} {'source':>10} {'imported':>10} {'merged':>8} {'invalid':>8}"]
        for name, t in self.tables.items():
            lines.append(f"{name:<20} {t.source:>10,} {t.imported:>10,} {t.merged:>8,} {t.invalid:>8,}")
        if self.datapoints:
            lines.append("datapoints:")
            for key, meaning in DATAPOINT_COUNTERS.items():
                if key in self.datapoints:
                    lines.append(f"  {self.datapoints[key]:>12,}  {meaning}")
        lines.extend(p.line() for p in self.problems)
        lines.extend(self.notes)
        return "\n".join(lines)
