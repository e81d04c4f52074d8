"""Helpers shared by the test modules: tiny real artifacts (images, shards, runs), HTTP calls."""
