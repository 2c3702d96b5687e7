"""Backends that gather signals from a real model and apply the core's decisions."""
