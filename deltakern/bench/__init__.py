"""The benchmark harness (timing, memory, environment), result rows and files, the providers
(deltakern and what users would otherwise run) and the default suite. Benchmarks import only the
public functions, the references, ``deltakern.core`` and ``deltakern.data`` (plus the synthetic
data generator and the prompt-tuning step counter they measure); scripts, results and the
pytest-benchmark files live in the repository's top-level ``bench/`` folder.

``from deltakern import bench as bm`` gives the harness and the result helpers in one name.
"""

from deltakern.bench.harness import *  # noqa: F403 - the harness's public names, one namespace
from deltakern.bench.harness import _reset_peak_rss  # noqa: F401 - used by the memory tests
from deltakern.bench.results import *  # noqa: F403
