"""The LipSyncModel operator. Its kopf handlers live in lipsync_operator.handlers, which the operator runs as
``kopf run --module=lipsync_operator.handlers --all-namespaces``; importing the package (or any other module of
it, e.g. lipsync_operator.placement) registers nothing. Settings come from ``LIPSYNC_OPERATOR_*`` environment
variables (lipsync_operator.config).
"""
