"""The DMP feed: per audience, anonymized member counts per time window and coarse bucket.

A profile is reduced to :class:`Facts` (``facts.py``); consent decides whether it counts
(``consent.py``); each dimension puts it in one bucket of a fixed vocabulary
(``countries.py``, ``devices.py``, ``channels.py``, gathered in ``dimensions.py``);
``anonymize.py`` suppresses what k-anonymity forbids and ``noise.py`` adds keyed Laplace
noise; ``counts.py`` runs it on a timer and publishes, ``repository.py`` holds the SQL.
Specified in docs/dmp.md.

The names below are the package's face to the API, which imports the package.
"""

from cdp_stream.activation.dmp.consent import opted_out
from cdp_stream.activation.dmp.dimensions import DIMENSIONS
from cdp_stream.activation.dmp.facts import Facts
from cdp_stream.activation.dmp.repository import read_counts

__all__ = ["DIMENSIONS", "Facts", "opted_out", "read_counts"]
