"""Rendering ops."""
