"""Cluster configuration, Ray placement and launch."""
