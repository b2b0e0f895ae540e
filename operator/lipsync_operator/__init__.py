"""The LipSyncModel operator: ``kopf run -m lipsync_operator --all-namespaces``.

Importing the package registers the kopf handlers (lipsync_operator.handlers). Settings come from
``LIPSYNC_OPERATOR_*`` environment variables (lipsync_operator.config).
"""

from lipsync_operator import handlers  # noqa: F401  (registers the handlers with kopf)

__all__ = ["handlers"]
