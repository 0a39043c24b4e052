"""Devices that sit behind vqscope's vhost-user back-end."""
