"""``lipsync`` subcommands: every module here exposes ``register(subparsers)``; cli.py discovers them."""
