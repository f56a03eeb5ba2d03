"""``python -m cdp_stream`` is the ``cdp-stream`` command."""

from cdp_stream.cli import main

main()
