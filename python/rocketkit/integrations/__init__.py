"""Adapters to outside APIs, one file each; nothing in rocketkit imports them except where noted."""
