"""The operator's tools: the `baton` command, the admin client, studies, provisioning and the demo.

Nothing here runs inside the coordinator service; `coordinator serve` imports only what it needs.
"""
