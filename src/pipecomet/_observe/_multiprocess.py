"""
Metrics of several serving processes (``--processes N``) in one scrape.

Each serving process keeps its own registry.  When ``/_pipecomet/metrics``
is asked of one of them, it asks the supervisor, which asks every serving
process for its families (:func:`families_of`, plain JSON over the control
pipes), waits up to ``[metrics] scrape_timeout`` seconds, and sends them
all back; the asking process labels every sample with its ``process``
(the serving process's index) and renders one exposition
(:func:`merged_exposition`).  Counters are never summed across processes
here: PromQL does that (``sum without (process) (...)``).

prometheus_client's own multiprocess mode was not used: it works only for
its metric objects updated on the request path (a lock and a file write
per update), not for custom collectors, which is how every figure here is
read; and its files outlive the processes that wrote them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Mapping, Sequence, TypedDict

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

__all__ = ["FamilyData", "Gathered", "families_of", "merged_exposition", "PROCESS_LABEL",
           "SUPERVISOR_FIGURES"]

#: The label each serving process's samples get.
PROCESS_LABEL = "process"


class FamilyData(TypedDict):
    """
    One metric family as JSON: what a serving process sends its supervisor.
    """

    name: str
    help: str
    type: str
    unit: str
    #: ``[sample name, labels, value]``
    samples: list[tuple[str, dict[str, str], float]]


def families_of(registry: CollectorRegistry) -> list[FamilyData]:
    """
    Every family of ``registry`` as JSON-ready data (collected now, on the
    reactor thread, as a scrape would).
    """
    out: list[FamilyData] = []
    for family in registry.collect():
        out.append({"name": family.name, "help": family.documentation, "type": family.type,
                    "unit": family.unit,
                    "samples": [(s.name, dict(s.labels), float(s.value))
                                for s in family.samples]})
    return out


class _Merged:
    """
    A collector yielding the families of several processes, each sample
    labelled with its process.
    """

    def __init__(self, parts: Mapping[str, Sequence[FamilyData]],
                 up: Mapping[str, bool]) -> None:
        self.parts = parts
        self.up = up

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import GaugeMetricFamily, Metric

        merged: dict[str, Metric] = {}
        for process in sorted(self.parts, key=_index_order):
            for fam in self.parts[process]:
                metric = merged.get(fam["name"])
                if metric is None:
                    metric = merged[fam["name"]] = Metric(fam["name"], fam["help"], fam["type"],
                                                          fam["unit"])
                elif metric.type != fam["type"]:
                    continue  # another version of the app mid-reload: keep the first kind
                for name, labels, value in fam["samples"]:
                    metric.add_sample(name, {**labels, PROCESS_LABEL: process}, value)
        up = GaugeMetricFamily("pipecomet_scrape_process_up", "1 when the serving process "
                               "answered this scrape in time, 0 when it did not.",
                               labels=[PROCESS_LABEL])
        for process in sorted(self.up, key=_index_order):
            up.add_metric([process], 1.0 if self.up[process] else 0.0)
        yield up
        yield from merged.values()


def _index_order(process: str) -> tuple[int, str]:
    return (int(process), process) if process.isdigit() else (1 << 30, process)


#: The supervisor's own figures in a scrape: key → (metric, type, help).
SUPERVISOR_FIGURES = {
    "processes": ("pipecomet_supervisor_processes", "gauge", "Serving processes configured."),
    "restarts": ("pipecomet_supervisor_restarts", "counter",
                 "Serving processes restarted after they ended."),
    "deaths": ("pipecomet_supervisor_deaths", "counter",
               "Serving processes that ended without being told to."),
    "reloads": ("pipecomet_supervisor_reloads", "counter", "SIGHUP reloads."),
}


class Gathered(TypedDict):
    """
    What the supervisor sends back for one scrape.
    """

    #: process index (as a string) → its families
    processes: dict[str, list[FamilyData]]
    #: process index → answered in time
    up: dict[str, bool]
    #: the supervisor's own figures (:data:`SUPERVISOR_FIGURES`)
    supervisor: dict[str, int]


class _SupervisorFigures:
    def __init__(self, figures: Mapping[str, int]) -> None:
        self.figures = figures

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        for key, (name, kind, doc) in SUPERVISOR_FIGURES.items():
            if key in self.figures:
                cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                yield cls(name, doc, value=self.figures[key])


def merged_exposition(gathered: Gathered) -> bytes:
    """
    One text exposition of every serving process's families, each sample
    with a ``process`` label, then ``pipecomet_scrape_process_up`` and the
    supervisor's own figures (no ``process`` label: they belong to none).
    """
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(gathered["processes"], gathered["up"]))
    registry.register(_SupervisorFigures(gathered.get("supervisor", {})))
    return generate_latest(registry)
