"""The device daemon: connection loop, local trainer, CLI."""
