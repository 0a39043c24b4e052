"""vqscope's userspace side: ring model, memory access, C decoder, vhost-user,
devices, sources and the CLI."""

__version__ = "0.1.0"
