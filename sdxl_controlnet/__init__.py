"""SDXL ControlNet serving on BentoML: the modules behind ``service.py``."""
