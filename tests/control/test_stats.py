"""StatsBook: counts summed over workers; a dead worker's counters are kept."""

from poise.control.stats import StatsBook


def report(in_flight, requests, errors, ejected=0, panic=False):
    return {"app": {"panic": panic,
                    "backends": {"h:1": [in_flight, requests, errors, ejected]}}}


def test_totals_sum_the_latest_report_of_each_worker():
    book = StatsBook()
    book.update(1, report(2, 10, 1))
    book.update(2, report(1, 5, 0, ejected=1))
    book.update(1, report(0, 12, 1))            # replaces worker 1's earlier report
    t = book.totals()[("app", "h:1")]
    assert (t.in_flight, t.requests, t.errors, t.ejected_in) == (1, 17, 1, 1)
    assert book.workers == 2


def test_a_retired_worker_keeps_its_counters_but_not_its_gauges():
    book = StatsBook()
    book.update(1, report(3, 10, 2, ejected=1, panic=True))
    assert book.panic("app")
    book.retire(1)
    book.update(2, report(1, 4, 0))
    t = book.totals()[("app", "h:1")]
    assert (t.in_flight, t.requests, t.errors, t.ejected_in) == (1, 14, 2, 0)
    assert not book.panic("app")


def test_forget_drops_kept_counts_of_removed_backends():
    book = StatsBook()
    book.update(1, report(0, 10, 0))
    book.retire(1)
    book.forget([("app", "other:2")])
    assert book.totals() == {}
