"""Fixtures for the chart tests; rendering and parsing helpers live in chart_support.py."""

import helm_python as helm
import pytest
from chart_support import CHART


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded
