"""The CPU front Service (`ControlNet`): everything only it runs. Torch-free, by a ruff rule."""
