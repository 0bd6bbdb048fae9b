"""The alignment dimensions as data: one `Dimension` per dimension, each defined in its own module.

A dimension names its judged metrics (the first is the headline the paper's three-dimension average is made of)
and its judge-free likelihood metrics, each with its label and direction; the field of an evaluation item that
holds the request; what its evaluation sample is stratified by; how per-item scores are read from its judge's
rows and how its judge is called. The tables, verdicts, statistics and the CLI read these instead of naming a
dimension. The three of the paper are registered here, in the book's order; another is one module defining a
`Dimension` and one `register` call.
"""

from h3fusion.dimensions.base import (
    DIMENSIONS,
    Dimension,
    Judge,
    Metric,
    SourceReport,
    get_dimension,
    register,
)
from h3fusion.dimensions.harmless import HARMLESS
from h3fusion.dimensions.helpful import HELPFUL
from h3fusion.dimensions.honest import HONEST

for _dimension in (HELPFUL, HARMLESS, HONEST):
    register(_dimension)

__all__ = [
    "DIMENSIONS",
    "HARMLESS",
    "HELPFUL",
    "HONEST",
    "Dimension",
    "Judge",
    "Metric",
    "SourceReport",
    "get_dimension",
    "register",
]
