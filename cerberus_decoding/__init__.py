"""Cerberus: speculative decoding with Cerberus heads and an entropy gate."""
