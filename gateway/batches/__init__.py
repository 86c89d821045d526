"""Deferrable work: OpenAI's Batch API (``/v1/files``, ``/v1/batches``), run when the
grid's carbon intensity is lowest inside each batch's completion window.

- :mod:`.wire`: the input file, request bodies and objects, as OpenAI defines them;
- :mod:`.store`: files, batches and their requests in SQLite in the state dir;
- :mod:`.plan`: when a batch starts (the cleanest start of its site's carbon forecast)
  and what its requests cost in CO₂ against running at once;
- :mod:`.scheduler`: the loop that runs batches, through the gateway's own app
  (:mod:`.dispatch`), by an injectable :mod:`.clock`;
- :mod:`.api`: the HTTP endpoints.
"""

from .api import routes
from .clock import Clock, ManualClock, SystemClock
from .scheduler import BatchService

__all__ = ["BatchService", "Clock", "ManualClock", "SystemClock", "routes"]
