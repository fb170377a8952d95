"""schemathesis hooks (loaded through SCHEMATHESIS_HOOKS by tests/test_schemathesis.py).

Long polls may legally wait 60 s; fuzzing them at full length would make the run take many
minutes without testing anything more, so generated waits are cut to half a second.
"""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.hook
def map_query(ctx: Any, query: dict[str, Any] | None) -> dict[str, Any] | None:
    if query and "wait" in query:
        try:
            if float(query["wait"]) > 0.5:
                query["wait"] = 0.5
        except (TypeError, ValueError):
            pass
    return query
