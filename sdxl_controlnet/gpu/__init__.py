"""The GPU Service (`SDXLControlNetService`): the only code that imports torch and diffusers."""
