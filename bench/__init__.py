"""Benchmarks: figures for both Services, printed and saved; they never fail a build."""
