"""vmexec.compare: the same call on several machine types, timed on the machines."""

from __future__ import annotations

import pytest

import helpers
from vmexec import ConfigError, compare


def test_compare_on_the_local_provider_times_each_candidate():
    result = compare(helpers.sleep_and_return, 0.05, instance_types=["c7g.large", "c7i.large"],
                     repeat=2, provider="local")
    assert [c.instance_type for c in result.candidates] == ["c7g.large", "c7i.large"]
    for candidate in result.candidates:
        assert candidate.error is None
        assert len(candidate.runtimes) == 2
        assert 0.05 <= candidate.median_seconds < 5  # measured around the call only
        assert candidate.usd_per_hour == 0.0  # local machines cost nothing
    text = result.text()
    assert "speed-up" in text and "c7g.large" in text and "$0.0000" in text


def test_compare_reports_a_failing_candidate_without_hiding_the_others():
    result = compare(helpers.fail, "boom", instance_types=["a.large"], repeat=1,
                     provider="local")
    assert result.candidates[0].error and "boom" in result.candidates[0].error
    assert "failed" in result.text()


def test_compare_validates_arguments():
    with pytest.raises(ConfigError, match="instance_types"):
        compare(helpers.add, 1, instance_types=[], provider="local")
    with pytest.raises(ConfigError, match="repeat"):
        compare(helpers.add, 1, instance_types=["x"], repeat=0, provider="local")
